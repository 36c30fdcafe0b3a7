"""Prompts for `clear synth`: a built-in, offline, deterministic set, or a .txt / .jsonl / .csv file.

The built-in set is composed from word lists (subjects, scenes, styles, lighting, composition). Candidate j is
picked by hashing (version, j), not by Python's `random`, so prompt i is the same on every machine and Python
version, and asking for more prompts never changes the first ones (a prefix property that resume relies on).
The prompts ask for no text in the image (no signs, letters, logos): FLUX draws text badly at small windows,
and a distillation set full of it would teach the wrong thing.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from clear_cli.errors import UsageError

BUILTIN = "builtin"
BUILTIN_VERSION = "clear-prompts-v1"  # bump when the lists change: a dataset records which set it used

def _words(text: str) -> list[str]:
    """A ';'-separated list spread over lines -> stripped phrases."""
    return [w.strip() for w in text.replace("\n", " ").split(";") if w.strip()]


_CREATURE_ADJECTIVES = _words("""
young; old; tiny; giant; sleeping; curious; playful; majestic; fluffy; lonely; proud; gentle; fierce;
cheerful; shy; wise; mischievous; graceful; tired; spotted; striped
""")

_THING_ADJECTIVES = _words("""
old; weathered; polished; rusty; glowing; ancient; futuristic; colorful; elegant; ornate; minimalist;
abandoned; miniature; oversized; vintage; handmade; moss-covered; snow-covered; sunlit; crystal;
wooden; golden; silver; copper; porcelain; paper; glass; marble; translucent; iridescent; brass
""")

_CREATURES = _words("""
fox; owl; cat; dog; horse; deer; wolf; bear; rabbit; hedgehog; otter; raccoon; tiger; lion; elephant;
giraffe; zebra; whale; dolphin; octopus; jellyfish; sea turtle; koi fish; parrot; hummingbird; peacock;
swan; heron; crow; penguin; flamingo; butterfly; dragonfly; beetle; snail; frog; chameleon; lizard;
tortoise; red panda; sloth; llama; robot; astronaut; knight in armor; samurai; ballet dancer; fisherman;
gardener; chef; street musician; sailor; painter; beekeeper; shepherd; blacksmith; potter; scientist;
mountain climber; dragon; unicorn; griffin
""")

_THINGS = _words("""
lighthouse; windmill; castle; cathedral; temple; pagoda; cottage; cabin; greenhouse; treehouse; bridge;
market stall; bookshop; cafe; bakery; observatory; clock tower; water mill; barn; sailboat; fishing boat;
steam locomotive; vintage car; motorcycle; bicycle; hot air balloon; airship; rowboat; tram; scooter;
camper van; teapot; violin; grand piano; typewriter; pocket watch; lantern; chess set; globe; telescope;
compass; hourglass; candle; vase of tulips; bowl of ramen; stack of pancakes; basket of apples;
loaf of bread; cup of coffee; bowl of fruit; birthday cake; sushi platter; pizza; bouquet of roses;
sunflower; cactus; bonsai tree; oak tree; willow tree; cherry blossom tree; mushroom; fern; lotus flower;
spaceship; space station; clockwork bird; paper lantern; armchair; spiral staircase; carousel;
ferris wheel; fountain; stone well; music box; kite; umbrella; treasure chest; birdhouse; snow globe
""")

_SCENES = _words("""
in a misty pine forest;on a rocky beach at low tide;in a sunlit meadow;on a snowy mountain pass;
in a quiet city street after rain;in a bustling night market;on a wooden dock by a lake;
in a cozy kitchen;in a dusty attic;in a grand library;in a glass greenhouse;in a desert canyon;
under a cherry blossom canopy;beside a frozen river;on a foggy moor;in a bamboo grove;
in an underwater kelp forest;on a cliff above the sea;in a field of lavender;in a tropical jungle;
on a rainy windowsill;in a medieval courtyard;on a space station;on the surface of the moon;
in an autumn park;in a snowy village square;on a sailing ship deck;in a candlelit cellar;
in a busy train station;on a rooftop at dusk;in a flooded forest;in a salt flat;beside a hot spring;
in an abandoned factory;in a mossy ruin;on a country road;in a wheat field;in a tea garden;
at the edge of a waterfall;inside a crystal cave;on a floating island;in a vegetable garden;
in a museum hall;on a quiet beach at dawn;in an alpine lake valley;in a Mediterranean harbor;
on a volcanic shore;in a mangrove swamp;in a birch forest;on a tundra plain;in a coral lagoon;
in a sunflower field;on a cobblestone alley;in a Japanese garden;in a minimalist white room;
on a marble staircase;in a stormy sea;in a pumpkin patch;on an orchard hillside;in a rice terrace;
in a snow globe;on a clean studio backdrop;against a pastel background;on a dark wooden table
""")

_STYLES = _words("""
a photograph;a 35mm film photograph;a macro photograph;an aerial photograph;a studio photograph;
an oil painting;a watercolor painting;a gouache illustration;an ink drawing;a pencil sketch;
a charcoal drawing;a pastel drawing;a 3D render;a claymation still;a low-poly render;
a digital painting;a concept art piece;an isometric illustration;a children's book illustration;
a ukiyo-e woodblock print;a linocut print;an art nouveau illustration;an impressionist painting;
a cinematic still;a vintage postcard scene;a Polaroid photo;a tilt-shift photograph;
a long-exposure photograph;a double-exposure photograph;a paper cut-out diorama;
a stained glass artwork;a mosaic;an embroidery;a felt craft scene;a voxel art render
""")

_LIGHTING = _words("""
golden hour light;soft overcast light;dramatic side lighting;warm candlelight;cool moonlight;
neon glow;dappled sunlight;backlit silhouette;blue hour twilight;harsh midday sun;
foggy diffuse light;rim lighting;studio softbox lighting;firelight;bioluminescent glow;
stormy light;northern lights overhead;sunrise haze;volumetric light rays;lantern light;
high-key lighting;low-key lighting;pastel morning light;reflected light from water
""")

_COMPOSITION = _words("""
close-up;wide shot;medium shot;aerial view;low angle;high angle;symmetrical composition;
rule of thirds;centered composition;shallow depth of field;deep focus;panoramic view;
top-down view;three-quarter view;extreme close-up;eye-level view;framed by foliage;
negative space;leading lines;reflection in water
""")

_SHOTS = _words("""
close-up; wide shot; medium shot; aerial view; low-angle shot; high-angle shot; top-down view;
three-quarter view; extreme close-up; eye-level view; panoramic view; side view
""")

_MOODS = _words("""
serene; whimsical; mysterious; cheerful; melancholic; epic; peaceful; dreamy; cozy; majestic;
nostalgic; vibrant; moody; calm; playful; eerie; hopeful; quiet
""")

# Four sentence shapes keep the prompts from all reading alike; each piece is picked from the hash bytes.
_TEMPLATES = (
    "{style} of {a_subject} {scene}, {lighting}, {composition}",
    "{a_subject} {scene}, {lighting}, {composition}, {mood} mood",
    "{shot} of {a_subject} {scene}, {style_short}, {lighting}",
    "{mood} {style_short} of {a_subject} {scene}, {lighting}",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _candidate(j: int) -> str:
    h = hashlib.sha256(f"{BUILTIN_VERSION}:{j}".encode()).digest()
    pick = [int.from_bytes(h[3 * k: 3 * k + 3], "little") for k in range(10)]
    if pick[0] % 2:
        noun, adjectives = _CREATURES[pick[1] % len(_CREATURES)], _CREATURE_ADJECTIVES
    else:
        noun, adjectives = _THINGS[pick[1] % len(_THINGS)], _THING_ADJECTIVES
    subject = noun if pick[2] % 5 == 0 else f"{adjectives[pick[3] % len(adjectives)]} {noun}"
    style = _STYLES[pick[4] % len(_STYLES)]
    return _TEMPLATES[pick[9] % len(_TEMPLATES)].format(
        style=style, style_short=style.split(" ", 1)[1], a_subject=_article(subject),
        scene=_SCENES[pick[5] % len(_SCENES)], lighting=_LIGHTING[pick[6] % len(_LIGHTING)],
        composition=_COMPOSITION[pick[7] % len(_COMPOSITION)], shot=_SHOTS[pick[7] % len(_SHOTS)],
        mood=_MOODS[pick[8] % len(_MOODS)],
    )


def builtin_prompts(n: int = 10_000) -> list[str]:
    """The first `n` prompts of the built-in set (unique; prompt i does not depend on n)."""
    out: list[str] = []
    seen: set[str] = set()
    j = 0
    while len(out) < n:
        p = _candidate(j)
        j += 1
        p = p[0].upper() + p[1:]
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _prompts_from_file(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--prompts {path}: not UTF-8 text", "save the prompt file as UTF-8") from None
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".jsonl":
        from clear_cli.data.layout import jsonl_rows

        prompts = []
        for no, row in jsonl_rows(text, f"--prompts {path}"):
            if not isinstance(row, dict) or column not in row:
                keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                raise UsageError(f"--prompts {path}: line {no} has no {column!r} field (it has: {keys})",
                                 "name the field with --prompt-column")
            if str(row[column]).strip():
                prompts.append(str(row[column]).strip())
        return prompts
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        cols = reader.fieldnames or []
        if column not in cols:
            raise UsageError(f"--prompts {path}: no column {column!r} (columns: {', '.join(cols) or 'none'})",
                             "pick one with --prompt-column")
        return [row[column].strip() for row in reader if (row.get(column) or "").strip()]
    raise UsageError(f"--prompts {path}: unknown file type {suffix or '(none)'!r}",
                     "use builtin, a .txt (a prompt a line), .jsonl (a 'prompt' field) or .csv (--prompt-column)")


def load_prompts(source: str | Path = BUILTIN, *, column: str = "prompt", n: int | None = None) -> list[str]:
    """Prompts from `builtin` (needs n) or a .txt / .jsonl / .csv file (all of its prompts)."""
    if str(source) == BUILTIN:
        if n is None:
            raise UsageError("the built-in prompt set needs --n", "e.g. --n 10000 (the authors' set size)")
        return builtin_prompts(n)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"--prompts {source}: file not found", "pass builtin or a .txt / .jsonl / .csv file")
    prompts = _prompts_from_file(path, column)
    if not prompts:
        raise UsageError(f"--prompts {path}: the file holds no prompts", "one prompt a line for .txt")
    return prompts


def prompts_fingerprint(source: str | Path, column: str) -> str:
    """What identifies a prompt source in the dataset card: the built-in version, or the file's hash."""
    if str(source) == BUILTIN:
        return BUILTIN_VERSION
    path = Path(source).expanduser()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    col = f":{column}" if path.suffix.lower() in (".jsonl", ".csv") else ""
    return f"sha256:{digest}{col}"
