"""Figures: PNG files are written, and the numbers drawn are the right ones."""

import numpy as np
import pytest

from rholearn import layout, plots
from rholearn.basis import BasisSet, Shell

WATER = [8, 1, 1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def basis():
    return BasisSet(
        name="test-basis",
        shells={
            "O": [Shell(0, (10.0,), (1.0,)), Shell(1, (3.0,), (1.0,)), Shell(2, (1.5,), (1.0,))],
            "H": [Shell(0, (2.0,), (1.0,)), Shell(1, (1.0,), (1.0,))],
        },
    )


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def test_parity_plot_reports_rmse_per_element_for_l0_and_the_rest(basis, tmp_path):
    rng = np.random.default_rng(0)
    n = basis.n_functions(["O", "H", "H"])
    reference = [layout.vector_to_tensormap(rng.normal(size=n), WATER, basis, s) for s in range(3)]
    rmse = plots.plot_parity(reference, reference, str(tmp_path / "same.png"))
    assert rmse == {"l=0": {"H": 0.0, "O": 0.0}, "l>0": {"H": 0.0, "O": 0.0}}

    shifted = []
    owner = [(atom, l) for atom, l, _, _ in basis.functions(["O", "H", "H"])]
    shift = np.array([0.1 if l == 0 else (0.2 if atom == 0 else 0.3) for atom, l in owner])
    for s, tensor in enumerate(reference):
        vector = layout.tensormap_to_vector(tensor, WATER, basis)
        shifted.append(layout.vector_to_tensormap(vector + shift, WATER, basis, s))
    rmse = plots.plot_parity(shifted, reference, str(tmp_path / "parity.png"))
    assert rmse["l=0"] == {"H": pytest.approx(0.1), "O": pytest.approx(0.1)}
    assert rmse["l>0"] == {"H": pytest.approx(0.3), "O": pytest.approx(0.2)}
    assert _is_png(tmp_path / "parity.png")


def test_parity_plot_refuses_misaligned_inputs(basis, tmp_path):
    n = basis.n_functions(["O", "H", "H"])
    water = layout.vector_to_tensormap(np.zeros(n), WATER, basis)
    oxygen = layout.vector_to_tensormap(np.zeros(basis.n_functions(["O"])), [8], basis)
    with pytest.raises(ValueError, match="different blocks or samples"):
        plots.plot_parity([water], [oxygen], str(tmp_path / "bad.png"))


def test_training_curves_read_the_log(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(
        "epoch,train_loss,val_loss,val_rmse_percent,learning_rate,seconds\n"
        "1,4.0,5.0,40.0,0.1,0.2\n2,2.0,3.0,30.0,0.1,0.2\n3,1.0,,,0.1,0.2\n"
    )
    drawn = plots.plot_training_curves(str(log), str(tmp_path / "curves.png"), loss="overlap")
    np.testing.assert_array_equal(drawn["train_loss"], [4.0, 2.0, 1.0])
    np.testing.assert_array_equal(drawn["val_rmse_percent"][:2], [40.0, 30.0])
    assert np.isnan(drawn["val_loss"][2])
    assert _is_png(tmp_path / "curves.png")


def test_empty_log_names_the_file(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss,val_loss,learning_rate,seconds\n")
    with pytest.raises(ValueError, match="log.csv"):
        plots.plot_training_curves(str(log), str(tmp_path / "curves.png"))


def test_learning_curve_slope(tmp_path):
    n = np.array([10, 30, 100])
    curves = {"power law": list(zip(n, 5.0 * n**-0.5)), "one point": [(10, 1.0)]}
    slopes = plots.plot_learning_curve(curves, str(tmp_path / "curve.png"))
    assert slopes["power law"] == pytest.approx(-0.5)
    assert np.isnan(slopes["one point"])
    assert _is_png(tmp_path / "curve.png")


@pytest.mark.parametrize("low, high, ticks", [
    (0.6, 3.0, [0.5, 1.0, 2.0]),
    (10, 100, [10, 20, 50, 100]),
    (1, 10000, [1, 10, 100, 1000, 10000]),
])
def test_learning_curve_ticks_are_plain_numbers(low, high, ticks):
    assert plots.nice_ticks(low, high) == pytest.approx(ticks)
