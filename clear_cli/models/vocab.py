"""In-memory word vocabulary of the built-in tiny FLUX's tokenizers (one token per word, no downloads).

The scene words come first (the tiny teacher is trained on captions made of them); common words follow so
that general prompts tokenize to something other than <unk>. Changing the order changes token ids and
invalidates trained tiny weights: only append.
"""

from __future__ import annotations

SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]

SCENE_WORDS = """
a an the one two three and with on in of at
small medium large big tiny huge
red orange yellow green blue purple pink white black gray grey brown cyan magenta teal
circle square triangle star ring stripes stripe cross diamond heart hexagon dot dots rectangle
top bottom left right center middle upper lower corner
background plain textured checkered striped gradient noisy dotted
circles squares triangles stars rings crosses diamonds hearts hexagons rectangles
""".split()

COMMON_WORDS = """
photo photograph picture image painting drawing illustration render sketch portrait landscape closeup view
of by from to for near under over above below behind beside between inside outside through across
cat dog bird horse fish car plane airplane boat ship train bus bicycle house tree flower mountain river lake
sea ocean beach forest city street road bridge tower castle garden field sky cloud clouds sun moon night day
sunset sunrise rain snow fog storm winter summer autumn spring light shadow dark bright colorful vivid soft
man woman child person people girl boy face hand eyes hair dress hat coat chair table room window door wall
floor kitchen book cup bottle glass apple fruit food bread cake plate bowl lamp clock phone computer
old new modern ancient futuristic vintage retro detailed realistic cinematic dramatic beautiful quiet busy
wooden stone metal glass golden silver paper fabric water fire ice sand grass leaves rock rocks
style art oil watercolor pencil digital film lens wide angle macro aerial shot lighting studio natural
is are sitting standing walking running flying lying floating holding looking under covered filled
very highly sharp focus high quality resolution 4k 8k
""".split()


def words() -> list[str]:
    """The full vocabulary in id order (specials first, duplicates dropped)."""
    seen: dict[str, None] = {}
    for w in SPECIALS + SCENE_WORDS + COMMON_WORDS:
        seen.setdefault(w, None)
    return list(seen)
