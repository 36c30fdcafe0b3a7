"""Exact work counting against brute force, and the paper's published figures."""

from __future__ import annotations

import pytest

from clear_cli.attention import attention_flops, circle_size, count_pairs, paper_pairs
from clear_cli.attention.counting import full_pairs, image_pairs
from clear_cli.attention.reference import dense_mask


@pytest.mark.parametrize("grid, t, r, f", [((3, 4), 2, 2, 1), ((6, 4), 0, 3, 2), ((8, 8), 5, 20, 4),
                                           ((7, 9), 3, 1, 1), ((1, 12), 4, 5, 1), ((12, 12), 1, 4, 3)])
def test_count_pairs_matches_brute_force(grid, t, r, f):
    assert count_pairs(grid, t, r, f) == int(dense_mask(grid, t, r, f).sum())


def test_interior_circle_sizes():
    assert [circle_size(r) for r in (1, 8, 16, 32)] == [1, 193, 793, 3205]


def test_paper_figures_flux_8k():
    grid, t, d_model = (512, 512), 512, 3072
    full = attention_flops(full_pairs(grid, t), d_model) / 1e12
    paper = attention_flops(paper_pairs(grid, t, 8), d_model) / 1e12
    exact = attention_flops(count_pairs(grid, t, 8), d_model) / 1e12
    assert round(full, 2) == 847.73
    assert round(paper, 2) == 3.92
    assert round(exact, 3) == 3.915
    assert 1 - paper / full > 0.995


def test_exact_and_paper_differ_at_low_resolution():
    exact = attention_flops(count_pairs((64, 64), 512, 32), 3072) / 1e12
    paper = attention_flops(paper_pairs((64, 64), 512, 32), 3072) / 1e12
    assert (round(exact, 3), round(paper, 3)) == (0.154, 0.216)


def test_pooled_tokens_add_quadratic_term():
    g, t, r = (16, 16), 4, 3
    assert count_pairs(g, t, r, 4) - count_pairs(g, t, r, 1) == 256 * 16
    assert image_pairs(g, r) == count_pairs(g, 0, r)


def test_count_rejects_bad_geometry():
    with pytest.raises(ValueError, match="down_factor 3"):
        count_pairs((8, 8), 4, 2, 3)
    with pytest.raises(ValueError, match="window"):
        count_pairs((8, 8), 4, 0)
