"""The per-patch linear probe (bench/probe.py) and the generator's coverage masks it labels from
(run end to end on mmr-tiny in tests/integration/bench/test_bench_probe_encoder.py)."""

import numpy as np
import pytest

from mm_retrieval.bench.probe import (
    _accuracy,
    fit_probe,
    neighbourhood,
    patch_labels,
)
from mm_retrieval.datasets import generate_compositional
from mm_retrieval.datasets.compositional import (
    BACKGROUND,
    PlacedObject,
    SceneObject,
    coverage,
    placed_objects,
    read_table,
    render,
)


def _placed(shape, colour, cx, cy, extent):
    from mm_retrieval.datasets.compositional import COLOURS

    return PlacedObject(SceneObject("large", colour, shape), cx, cy, extent, COLOURS[colour])


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_coverage_matches_the_rendered_image(shape):
    placed = [_placed(shape, "red", 20.3, 30.7, 21.0), _placed("square", "blue", 48.0, 12.0, 12.0)]
    image = render(placed, 64, np.random.default_rng(0)).astype(int)
    cov = coverage(placed, 64)
    assert cov.shape == (2, 64, 64) and cov.max() == 1.0 and (cov.sum(0) <= 1.0 + 1e-6).all()
    for i, p in enumerate(placed):  # fully covered pixels carry the object's fill exactly
        assert (image[cov[i] == 1.0] == p.rgb).all()
    assert (image[cov.sum(0) == 0] == BACKGROUND).all()
    # A partly covered pixel is the same blend of fill and background as its share says.
    part = (cov[0] > 0.2) & (cov[0] < 0.8)
    blend = cov[0][part, None] * np.array(placed[0].rgb) + (1 - cov[0][part, None]) * np.array(BACKGROUND)
    assert np.abs(image[part] - blend).max() <= 2


def test_patch_labels_follow_the_rule():
    row = {"size_1": "large", "colour_1": "green", "shape_1": "square", "x_1": "16", "y_1": "16", "extent_1": "16",
           "size_2": "small", "colour_2": "red", "shape_2": "circle", "x_2": "28", "y_2": "4", "extent_2": "6"}
    (labels,) = patch_labels([row], 32, 8)
    assert len(labels) == 16
    covered = {j: lab for j, lab in enumerate(labels) if lab}
    # The square spans pixels 8..24: exactly the patches at rows/cols 1-2, each fully covered.
    assert covered == {j: ("green", "square", 1.0) for j in (5, 6, 9, 10)}
    # The small circle covers under half of its patch: not counted; with a lower bar it is.
    (loose,) = patch_labels([row], 32, 8, min_cover=0.2)
    assert loose[3][:2] == ("red", "circle")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_labels([row], 30, 8)


def test_placed_objects_reads_a_generated_table(tmp_path):
    data = generate_compositional(tmp_path, n_train=4, n_test=4, image_size=64)
    row = read_table(data.train_table)[0]
    placed = placed_objects(row)
    assert [p.obj.shape for p in placed] == [row["shape_1"], row["shape_2"]]
    assert placed[0].cx == float(row["x_1"]) and placed[1].extent == float(row["extent_2"])


def test_neighbourhood_puts_each_patch_next_to_its_neighbours():
    grid = np.arange(16, dtype=np.float32).reshape(1, 16, 1)  # a 4 x 4 grid, value = patch index
    hood = neighbourhood(grid)
    assert hood.shape == (1, 16, 9)
    assert hood[0, 5].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # an inner patch: all 9
    assert hood[0, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 4, 5]  # a corner: zeros past the border
    with pytest.raises(ValueError, match="square grid"):
        neighbourhood(np.zeros((1, 12, 2), np.float32))


def test_probe_learns_a_linear_rule_and_scores_balanced_accuracy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    y = np.argmax(x[:, :3], axis=1)  # linearly decodable, three classes
    model = fit_probe(x[:400], y[:400], 3, l2=1e-4, seed=0)
    assert _accuracy(model, x[400:], y[400:]) > 0.9
    constant = (np.zeros((5, 3), np.float32), np.array([1.0, 0.0, 0.0], np.float32))  # always class 0
    y_skewed = np.array([0, 0, 0, 1])
    assert _accuracy(constant, np.zeros((4, 5), np.float32), y_skewed) == 0.75
    assert _accuracy(constant, np.zeros((4, 5), np.float32), y_skewed, balanced=True) == 0.5
