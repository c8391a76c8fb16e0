"""``rholearn export``: the file loads in a process that imports neither rholearn nor
featomic (the extensions are bundled), predicts what ``rholearn predict`` predicts
for a trained model, carries named metadata and a unit, and fails cleanly (one line,
nothing left behind) when killed, on a full disk or on an unwritable target.
Real PySCF targets (HF/sto-3g, fitted in def2-universal-jfit) of a few waters."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import ase.io
import metatensor.torch as mts
import pytest
import torch
from metatomic.torch import load_atomistic_model

from rhocalc import cli as rhocalc_cli
from rhocalc.structures import distorted_waters
from rholearn import cli
from rholearn.basis import BasisSet
from rholearn.export import EXPORT_FORMAT, OUTPUT_NAME, OUTPUT_UNIT, export_atomistic
from rholearn.files import atomic_path, remove_orphans

FAST = ["--xc", "HF", "--basis", "sto-3g", "--auxbasis", "def2-universal-jfit", "--quiet"]
ENVIRONMENT = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A default (kernel, direct solve) model trained on 6 distorted waters, and 3 others."""
    root = tmp_path_factory.mktemp("export")
    structures = str(root / "waters.xyz")
    ase.io.write(structures, distorted_waters(6, seed=2))
    dataset = str(root / "dataset")
    assert rhocalc_cli.main(["pyscf", structures, "--out", dataset, *FAST]) == 0
    run_dir = str(root / "run")
    assert cli.main(["train", dataset, "--run", run_dir, "--n-train", "5", "--n-val", "1",
                     "--no-train.verbose"]) == 0
    new = str(root / "new.xyz")
    ase.io.write(new, distorted_waters(3, seed=7))
    return {"run": run_dir, "new": new, "root": root, "dataset": dataset}


FRESH_PROCESS = r"""
import json, sys
import ase.io, torch
import metatensor.torch as mts
from metatomic.torch import ModelEvaluationOptions, ModelOutput, load_atomistic_model, systems_to_torch
from vesin.metatomic import neighbor_lists_for_model

model_path, extensions, structures, predictions = sys.argv[1:5]
model = load_atomistic_model(model_path, extensions_directory=extensions)
frames = ase.io.read(structures, ":")
systems = systems_to_torch(frames, dtype=getattr(torch, model.capabilities().dtype))
for calculator in neighbor_lists_for_model("angstrom", model):
    calculator.add_neighbor_list(systems)
name = "rholearn::density_coefficients"
options = ModelEvaluationOptions(length_unit="angstrom", outputs={name: ModelOutput(sample_kind="atom")})
exported = model(systems, options, check_consistency=True)[name]
largest, scale, blocks = 0.0, 0.0, 0
for system, folder in enumerate(json.loads(predictions)):
    predicted = mts.load(folder + "/coefficients.mts")
    for key, block in predicted.items():
        ours = exported.block(key)
        rows = ours.samples.column("system") == system
        assert ours.samples.column("atom")[rows].tolist() == block.samples.column("atom").tolist()
        assert ours.properties == block.properties and ours.components == block.components
        largest = max(largest, float((ours.values[rows] - block.values).abs().max()))
        scale = max(scale, float(block.values.abs().max()))
        blocks += 1
imported = sorted(m for m in sys.modules if m.split(".")[0] in ("rholearn", "featomic", "rhocalc"))
print(json.dumps({"largest": largest, "scale": scale, "blocks": blocks, "imported": imported}))
"""


def test_export_loads_without_rholearn_and_matches_predict(run, tmp_path):
    out = str(tmp_path / "model.pt")
    extensions = str(tmp_path / "ext")
    assert cli.main(["export", run["run"], "--out", out, "--extensions", extensions]) == 0
    predictions = str(tmp_path / "predictions")
    assert cli.main(["predict", run["run"], run["new"], "--out", predictions]) == 0
    folders = [os.path.join(predictions, atoms.info["name"])
               for atoms in ase.io.read(run["new"], ":")]
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, out, extensions, run["new"], json.dumps(folders)],
        capture_output=True, text=True, env=ENVIRONMENT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["imported"] == []
    assert found["blocks"] > 3 * 4  # every block of every structure compared
    assert found["largest"] <= 1e-12 * found["scale"], found  # measured: 0 (bit for bit)


@pytest.fixture(scope="module")
def torch_run(run):
    """The same model with the pure-torch spherical expansion."""
    run_dir = str(run["root"] / "torch-run")
    assert cli.main(["train", run["dataset"], "--run", run_dir, "--n-train", "5", "--n-val", "1",
                     "-r", "descriptor_options.expansion=torch", "--no-train.verbose"]) == 0
    return run_dir


WITHOUT_FEATOMIC = r"""
import importlib.abc, json, sys


class RefuseFeatomic(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "featomic":
            raise ImportError(f"featomic is not installed here ({name})")


sys.meta_path.insert(0, RefuseFeatomic())
import ase.io, torch
import metatensor.torch as mts
from metatomic.torch import ModelEvaluationOptions, ModelOutput, load_atomistic_model, systems_to_torch
from vesin.metatomic import neighbor_lists_for_model

model_path, structures, out = sys.argv[1:4]
model = load_atomistic_model(model_path)  # no extensions folder
systems = systems_to_torch(ase.io.read(structures, ":"), dtype=torch.float64)
for calculator in neighbor_lists_for_model("angstrom", model):
    calculator.add_neighbor_list(systems)
name = "rholearn::density_coefficients"
options = ModelEvaluationOptions(length_unit="angstrom", outputs={name: ModelOutput(sample_kind="atom")})
mts.save(out, model(systems, options, check_consistency=True)[name])
imported = sorted(m for m in sys.modules if m.split(".")[0] in ("rholearn", "featomic", "rhocalc"))
print(json.dumps({"imported": imported, "libraries": sorted(torch.ops.loaded_libraries)}))
"""


@pytest.mark.parametrize("trained_with", ["torch", "featomic"])
def test_export_with_the_torch_expansion_runs_without_featomic(trained_with, torch_run, run,
                                                               tmp_path):
    """A model trained with the pure-torch expansion, or the default one exported with
    ``--expansion torch``, exports without extensions (even with featomic's loaded here) and
    predicts in a process that cannot import featomic what ``predict`` gives here."""
    import featomic.torch  # noqa: F401  loaded in the exporting process: the export leaves it out

    run_dir = torch_run if trained_with == "torch" else run["run"]
    loaded = set(torch.ops.loaded_libraries)
    out, extensions = str(tmp_path / "model.pt"), tmp_path / "ext"
    choice = [] if trained_with == "torch" else ["--expansion", "torch"]
    assert cli.main(["export", run_dir, "--out", out, "--extensions", str(extensions), *choice]) == 0
    assert torch.ops.loaded_libraries == loaded  # hidden during the export only
    assert list(extensions.iterdir()) == []
    recorded = {"extensions": "", "extensions-deps": ""}
    torch.jit.load(out, _extra_files=recorded)
    assert json.loads(recorded["extensions"]) == [] and json.loads(recorded["extensions-deps"]) == []

    coefficients = str(tmp_path / "exported.mts")
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_FEATOMIC, out, run["new"], coefficients],
        capture_output=True, text=True, env=ENVIRONMENT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["imported"] == []
    assert not any("featomic" in library for library in found["libraries"]), found

    model = cli.load_model(run_dir)
    uses_featomic = any(type(m).__module__.startswith("featomic") for m in model.pipeline().modules())
    assert uses_featomic == (trained_with == "featomic")
    expected = model.predict(ase.io.read(run["new"], ":"))
    exported = mts.load(coefficients)
    assert exported.keys == expected.keys and len(expected) > 3 * 2
    for key, block in expected.items():
        assert exported.block(key).samples == block.samples
        torch.testing.assert_close(exported.block(key).values, block.values, rtol=0, atol=1e-10)

    if trained_with == "featomic":  # the model itself keeps featomic's expansion
        expansion = model.descriptor.module.expansion
        export_atomistic(model, str(tmp_path / "again.pt"), expansion="torch")
        assert model.descriptor.module.expansion is expansion
        assert list((tmp_path / "extensions").iterdir()) == []  # the default folder


def test_the_expansion_choice_needs_a_contracted_descriptor(tmp_path):
    from rhocalc.pyscf import basis_set
    from rholearn.models import DensityModel

    model = DensityModel(basis_set("def2-universal-jfit", ["H", "O"]), descriptor="stock")
    with pytest.raises(ValueError, match="needs a contracted descriptor, this model's is 'stock'"):
        export_atomistic(model, str(tmp_path / "model.pt"), expansion="torch")
    assert not (tmp_path / "model.pt").exists()


def test_export_metadata(run, tmp_path):
    out = str(tmp_path / "model.pt")
    assert cli.main(["export", run["run"], "--out", out, "--author", "A. Person",
                     "--author", "B. Person"]) == 0
    assert os.path.isdir(tmp_path / "extensions")  # default: beside the file
    loaded = load_atomistic_model(out, extensions_directory=str(tmp_path / "extensions"))
    capabilities = loaded.capabilities()
    assert capabilities.atomic_types == [1, 8]
    assert capabilities.length_unit == "angstrom"
    assert capabilities.dtype == "float64"
    output = capabilities.outputs[OUTPUT_NAME]
    assert output.unit == OUTPUT_UNIT and output.sample_kind == "atom"
    assert "def2-universal-jfit" in output.description
    metadata = loaded.metadata()
    assert metadata.name == "rholearn kernel density model (def2-universal-jfit; H O)"
    assert "electrons / Bohr^3" in metadata.description
    assert metadata.authors == ["A. Person", "B. Person"]
    assert any("10.1021/acscentsci.8b00551" in r for r in metadata.references["architecture"])
    assert metadata.extra["format"] == EXPORT_FORMAT
    basis = BasisSet.from_dict(json.loads(metadata.extra["basis"]))
    assert basis.name == "def2-universal-jfit" and basis.elements == ["H", "O"]


def _export_command(run_dir, out, *extra):
    return [sys.executable, "-m", "rholearn.cli", "export", run_dir, "--out", out, *extra]


def _tmp_files(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith(".tmp-"))


KILLED_WRITER = """
import sys, time
from rholearn.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    open(tmp, "w").write("half a model")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_killed_export_leaves_nothing_behind(run, tmp_path):
    """SIGKILL at random points of the export: the file is absent or complete; what a
    killed writer left is removed by the next export."""
    out = str(tmp_path / "model.pt")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, out], env=ENVIRONMENT,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert len(_tmp_files(tmp_path)) == 1  # a killed writer's half-written file
    rng = random.Random(3)
    for _ in range(4):
        process = subprocess.Popen(_export_command(run["run"], out), env=ENVIRONMENT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 6.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if os.path.exists(out):
            load_atomistic_model(out, extensions_directory=str(tmp_path / "extensions"))
    subprocess.run(_export_command(run["run"], out), env=ENVIRONMENT, check=True,
                   capture_output=True)
    assert _tmp_files(tmp_path) == []
    load_atomistic_model(out, extensions_directory=str(tmp_path / "extensions"))


def test_orphans_of_running_writers_stay(tmp_path):
    path = str(tmp_path / "model.pt")
    with atomic_path(path) as tmp:  # this process is alive: its file is not an orphan
        open(tmp, "w").close()
        dead = str(tmp_path / ".tmp-999999999-model.pt")
        open(dead, "w").close()
        assert remove_orphans(path) == [dead]
        assert os.path.exists(tmp)


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_failed_extensions_copy_is_one_line(run, tmp_path):
    """A library that cannot be copied (a file-size limit stands in for a full disk)
    ends with exit 2 and one line naming the extensions folder."""
    out = str(tmp_path / "model.pt")
    result = subprocess.run(_export_command(run["run"], out), env=ENVIRONMENT,
                            capture_output=True, text=True, preexec_fn=_limit_file_size(2**20))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rholearn export: error: "), result.stderr
    assert "File too large" in lines[0] and str(tmp_path / "extensions") in lines[0]
    assert _tmp_files(tmp_path) == [] and not os.path.exists(out)


FULL_DISK = """
set -u
mount -t tmpfs -o size=$SIZE none $DISK || exit 77
$EXPORT --out $DISK/model.pt --extensions $EXTENSIONS > /dev/null || exit 78
cp $DISK/model.pt $OUT/before.pt
head -c $FILL /dev/zero > $DISK/filler
$EXPORT --out $DISK/model.pt --extensions $EXTENSIONS 2> $OUT/stderr
echo $? > $OUT/rc
ls -a $DISK > $OUT/listing
cmp -s $DISK/model.pt $OUT/before.pt && echo same > $OUT/compared
"""


def test_full_disk_is_one_line(run, tmp_path):
    """On a full disk (a small tmpfs in a user namespace), the export ends with exit 2
    and one line naming the file, no C++ abort; the earlier export stays intact."""
    size = os.path.getsize(os.path.join(run["run"], "model.pt"))  # about the exported size
    disk = tmp_path / "disk"
    disk.mkdir()
    export = " ".join(_export_command(run["run"], "")[:-2])
    environment = dict(ENVIRONMENT, SIZE=str(3 * size), DISK=str(disk), OUT=str(tmp_path),
                       EXTENSIONS=str(tmp_path / "extensions"), FILL=str(int(1.5 * size)),
                       EXPORT=export)
    result = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", FULL_DISK],
                            env=environment, capture_output=True, text=True)
    if result.returncode == 77 or "unshare" in result.stderr:
        pytest.skip(f"cannot mount a small filesystem here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    stderr = (tmp_path / "stderr").read_text().strip()
    assert (tmp_path / "rc").read_text().strip() == "2", stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert "No space left on device" in stderr and str(disk / "model.pt") in stderr
    assert ".tmp-" not in (tmp_path / "listing").read_text()
    assert (tmp_path / "compared").read_text().strip() == "same"


def test_unwritable_target_is_one_line(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli.main(["export", run["run"], "--out", str(blocker / "model.pt"),
                     "--extensions", str(tmp_path / "ext")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(blocker) in error, error


def test_extensions_folder_with_other_files_is_refused(run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["export", run["run"], "--out", str(tmp_path / "model.pt"),
                     "--extensions", str(tmp_path)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
