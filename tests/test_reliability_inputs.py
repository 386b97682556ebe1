"""Bad inputs and faults of the machine, met the way a user meets them.

Guaranteed: a bad parameter, params file, model folder or download is refused in one line
(exit 2) naming what is wrong, quickly and without allocating what the bad value asks for,
with nothing written; a full disk while writing a checkpoint or the model is one line
(exit 1) and leaves no partial or temporary file; temporary files of a killed write are
removed at the next start; outputs are 0644 (under umask 022); every command finds an
unreachable tracking server in seconds; ``translate`` never writes into its input folder and
never replaces a file it did not write without ``--overwrite``.

The rules are tested in-process on the library (config, YAML, model folders, downloads, the
translate guard), each category once more through the ``cyclegan`` command.
"""

from __future__ import annotations

import json
import os
import stat
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from PIL import Image

from cyclegan.config import load_config
from cyclegan.data.sources import download
from cyclegan.errors import ConfigError, DataError, InputError, ModelError
from cyclegan.models import GeneratorSpec, init_weights, save_generators
from cyclegan.models.io import load_generator, read_model_json
from cyclegan.translate import SOFTWARE_TAG, translate
from tests.faults import (  # noqa: F401
    Cli,
    FileServer,
    dead_pid,
    empty_store_fixture,
    error_line,
    file_server_fixture,
    hung_server,
    only_line,
    project,
    run,
    run_status,
    small_tmpfs,
    started,
    temp_files,
    train_args,
    user_env,
    wait_until,
)
from tests.train_support import sets

MB = 1 << 20


def _folder_state(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _bounded(fn, *, seconds: float = 5.0, megabytes: float = 100.0) -> Exception:
    """Run ``fn``, which must raise; assert it took less than ``seconds`` and allocated less
    than ``megabytes`` at its peak (Python allocations, tracemalloc). Returns the error."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        fn()
    except Exception as e:
        took = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
        assert took < seconds, f"took {took:.1f}s"
        assert peak < megabytes, f"allocated {peak:.0f} MB"
        return e
    tracemalloc.stop()
    raise AssertionError("no error")


def _short_one_line(e: Exception, limit: int = 400) -> str:
    text = str(e)
    assert "\n" not in text and len(text) < limit, text
    return text


# ---------------------------------------------------------------------------------------------
# Parameters and params files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=.nan", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.lambda_A=.inf", "train.lambda_A"),
        ("train.lambda_identity=-.inf", "train.lambda_identity"),
        ("train.lr=" + "9" * 400, "train.lr"),  # a 400-digit number: inf as a float
        ("train.seed=18446744073709551616", "train.seed"),
        ("data.seed=-1", "data.seed"),
        ("train.ngf=100000000", "train.ngf"),
        ("train.crop_size=1000000000", "train.crop_size"),
        ("train.max_steps=" + "1" * 40, "train.max_steps"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.num_threads=100000", "train.num_threads"),
        ("evaluate.batch_size=100000000", "evaluate.batch_size"),
        ("data.max_archive_bytes=0", "data.max_archive_bytes"),
        ("train.lr=" + "x" * 100_000, "train.lr"),  # a huge value: its repr is cut short
    ],
)
def test_impossible_values_are_one_short_line_naming_the_key(override: str, key: str) -> None:
    """NaN, infinities, huge seeds and widths, zero or absurd sizes: each is a ConfigError
    (exit 2) naming the key, in one short line, before anything is built."""
    e = _bounded(lambda: load_config(None, [override]))
    assert isinstance(e, ConfigError) and e.exit_code == 2
    assert key in _short_one_line(e)


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


DUPLICATE_KEY = "train:\n  lr: 0.1\n  ngf: 8\n  lr: 0.2\n"
DUPLICATE_SECTION = "train:\n  lr: 0.1\ndata:\n  seed: 1\ntrain:\n  ngf: 8\n"
# Nine levels of nine aliases: 387 million values once expanded, under a valid key.
ALIAS_BOMB = "mlflow:\n  run_name: [" + ", ".join(
    [f"&a0 [{', '.join(['x'] * 9)}]"]
    + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
) + "]\n"  # fmt: skip


def test_duplicate_keys_and_sections_are_refused_with_both_lines(tmp_path: Path) -> None:
    """A key or a whole section written twice is refused naming both line numbers (YAML
    loaders keep the last one silently)."""
    e = _bounded(lambda: load_config(_write(tmp_path / "p.yaml", DUPLICATE_KEY)))
    assert isinstance(e, ConfigError)
    assert "key 'lr' appears twice (lines 2 and 4)" in _short_one_line(e)
    e = _bounded(lambda: load_config(_write(tmp_path / "p.yaml", DUPLICATE_SECTION)))
    assert "key 'train' appears twice (lines 1 and 5)" in _short_one_line(e)


def test_yaml_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path: Path) -> None:
    """Aliases that would expand a 600-byte file into 387 million values are refused before
    expansion: in well under a second's work and a few MB (before: 78 s, 5.3 GB, then a
    MemoryError whose message embedded the value)."""
    path = _write(tmp_path / "bomb.yaml", ALIAS_BOMB)
    e = _bounded(lambda: load_config(path), seconds=5, megabytes=20)
    assert isinstance(e, ConfigError)
    assert "aliases" in _short_one_line(e)


def test_unreadable_params_files_are_one_line(tmp_path: Path) -> None:
    """A params file that is not UTF-8 (a Latin-1 editor), or absurdly large, or a folder:
    one line saying so."""
    latin1 = _write(tmp_path / "latin1.yaml", "mlflow:\n  run_name: caf\xe9\n".encode("latin-1"))
    e = _bounded(lambda: load_config(latin1))
    assert "is not UTF-8 text (byte 0xe9 at offset 23)" in _short_one_line(e)
    big = _write(tmp_path / "big.yaml", "# padding\n" * 120_000)
    e = _bounded(lambda: load_config(big))
    assert "a params file is a few KB" in _short_one_line(e)
    e = _bounded(lambda: load_config(tmp_path))
    assert "is a folder" in _short_one_line(e)


@pytest.mark.parametrize(
    ("command", "files"),
    [
        (["train", "--set", "train.lr=.nan"], {}),
        (["train", "--set", "train.ngf=100000000"], {}),
        (["train", "--params", "p.yaml"], {"p.yaml": DUPLICATE_KEY}),
        (["train", "--params", "p.yaml"], {"p.yaml": ALIAS_BOMB}),
        (["prepare"], {"params.yaml": "data:\n  source: caf\xe9\n".encode("latin-1")}),
        (["evaluate", "--set", "evaluate.batch_size=100000000"], {}),
        (["register", "--set", "train.seed=-5"], {}),
    ],
)
def test_cli_refuses_bad_parameters_in_one_line_writing_nothing(
    tmp_path: Path, command: list[str], files: dict[str, str | bytes]
) -> None:
    """Through the command: exit 2, stderr one line, and the folder exactly as it was (no
    lock, no store, no checkpoint)."""
    for name, text in files.items():
        _write(tmp_path / name, text)
    before = _folder_state(tmp_path)
    r = run(command, tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    only_line(r.stderr, command[0])
    assert _folder_state(tmp_path) == before


@pytest.mark.slow
def test_cli_train_refuses_a_damaged_image_and_too_many_ranks(
    tmp_path: Path, empty_store: Path
) -> None:
    """A prepared image damaged after prepare (here: random bytes) and more DDP ranks than
    the node has devices: each is one line, exit 2, before any checkpoint or rank starts."""
    work = project(tmp_path / "p", empty_store)
    r = run(train_args("train.nproc_per_node=100000"), work)
    assert r.returncode == 2, r.stderr
    assert "train.nproc_per_node = 100000 is more ranks than" in only_line(r.stderr, "train")
    (work / "data/prepared/trainA/trainA_003.png").write_bytes(os.urandom(300))
    r = run(train_args(), work)
    assert r.returncode == 2, r.stderr
    assert "trainA_003.png is not a readable image" in error_line(r.stderr, "train")
    assert not (work / "checkpoints").exists() and not (work / "models").exists()


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------

SPEC = GeneratorSpec(ngf=4, n_blocks=2)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A valid model folder (two tiny generators + model.json)."""
    nets = [SPEC.build(), SPEC.build()]
    g = torch.Generator().manual_seed(0)
    for net in nets:
        init_weights(net, generator=g)
    return save_generators(tmp_path / "model", nets[0], nets[1], SPEC)


def _edit_json(folder: Path, edit) -> None:
    meta = json.loads((folder / "model.json").read_text())
    edit(meta)
    (folder / "model.json").write_text(json.dumps(meta))


def _wider_g_a(folder: Path) -> None:
    other = GeneratorSpec(ngf=8, n_blocks=2)
    save_generators(folder.parent / "wide", other.build(), other.build(), other)
    (folder / "G_A.safetensors").write_bytes(
        (folder.parent / "wide" / "G_A.safetensors").read_bytes()
    )


DAMAGES = {
    "not JSON": (lambda d: (d / "model.json").write_text("{nope"), "not valid JSON"),
    "a JSON list": (lambda d: (d / "model.json").write_text("[1, 2]"), "unsupported model format"),
    "format 2": (lambda d: _edit_json(d, lambda m: m.update(format=2)), "unsupported model"),
    "an extra key": (
        lambda d: _edit_json(d, lambda m: m["generator"].update(dropout=0.5)),
        "unknown generator setting 'dropout'",
    ),
    "an absurd width": (
        lambda d: _edit_json(d, lambda m: m["generator"].update(ngf=100_000_000)),
        "ngf = '100000000' is not an integer in [1, 256]",
    ),
    "an absurd depth": (
        lambda d: _edit_json(d, lambda m: m["generator"].update(n_blocks=10**9)),
        "n_blocks",
    ),
    "a boolean width": (
        lambda d: _edit_json(d, lambda m: m["generator"].update(ngf=True)),
        "is not an integer",
    ),
    "garbage weights": (
        lambda d: (d / "G_A.safetensors").write_bytes(os.urandom(4096)),
        "is not a readable safetensors file",
    ),
    "truncated weights": (
        lambda d: (d / "G_A.safetensors").write_bytes((d / "G_A.safetensors").read_bytes()[:999]),
        "is not a readable safetensors file",
    ),
    "a header claiming 4 EB": (
        lambda d: (d / "G_A.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + b"{}"),
        "is not a readable safetensors file",
    ),
    "weights of another width": (_wider_g_a, "does not fit the generator model.json describes"),
    "no G_A": (lambda d: (d / "G_A.safetensors").unlink(), "is missing"),
    "no model.json": (lambda d: (d / "model.json").unlink(), "is not a model folder"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_model_folders_are_one_line_before_any_allocation(
    model_dir: Path, damage: str
) -> None:
    """Each damage of a model folder is a ModelError (exit 2) in one short line, found
    before the network is built (an absurd width allocates nothing)."""
    change, message = DAMAGES[damage]
    change(model_dir)
    e = _bounded(lambda: load_generator(model_dir, "A2B"), megabytes=50)
    assert isinstance(e, ModelError) and e.exit_code == 2
    assert message in _short_one_line(e), str(e)


def test_cli_translate_and_evaluate_refuse_a_damaged_model_in_one_line(
    model_dir: Path, tmp_path: Path
) -> None:
    """``cyclegan translate`` and ``cyclegan evaluate`` with an absurd model.json: exit 2,
    one line, nothing written."""
    DAMAGES["an absurd width"][0](model_dir)
    project(tmp_path / "p")
    images = tmp_path / "p/data/prepared/testA"
    r = run(["translate", "--model", str(model_dir), "--input", str(images), "--output", "out"],
            tmp_path / "p")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "is not an integer in [1, 256]" in only_line(r.stderr, "translate")
    assert not (tmp_path / "p/out").exists()
    r = run(["evaluate", "--model-dir", str(model_dir)], tmp_path / "p", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "is not an integer in [1, 256]" in error_line(r.stderr, "evaluate")
    assert not (tmp_path / "p/metrics/eval.json").exists()


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------


def test_download_without_content_length_stops_at_the_bound(
    tmp_path: Path, file_server: FileServer
) -> None:
    """A server that sends no Content-Length and 64 MB of body: the download stops soon
    after ``limit`` bytes, the partial file is deleted (never resumed, never "verified"), and
    the error says which bound. Before: 300 MB went to disk despite a 10 MB bound."""
    dest = tmp_path / "downloads/big.zip"
    e = _bounded(
        lambda: download(f"{file_server.url}/stream/{64 * MB}", dest, size=None, sha256=None,
                         limit=MB),
        seconds=20,
    )  # fmt: skip
    assert isinstance(e, DataError) and e.exit_code == 2
    assert "larger than data.max_archive_bytes=1048576" in _short_one_line(e)
    assert list(dest.parent.iterdir()) == []
    wait_until(lambda: file_server.sent, 10, "the server to see the client hang up")
    (_, sent), = file_server.sent  # fmt: skip
    assert sent < 32 * MB, f"the server got {sent} bytes out"


def test_download_with_a_too_large_content_length_writes_nothing(
    tmp_path: Path, file_server: FileServer
) -> None:
    """A Content-Length above the bound is refused before the body is read."""
    file_server.files["big.zip"] = b"\0" * (4 * MB)
    dest = tmp_path / "downloads/big.zip"
    e = _bounded(lambda: download(f"{file_server.url}/big.zip", dest, size=None, sha256=None,
                                  limit=MB), seconds=20)  # fmt: skip
    assert isinstance(e, DataError) and "larger than data.max_archive_bytes" in str(e)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def test_download_without_published_sha256_is_verified_on_reuse(
    tmp_path: Path, file_server: FileServer
) -> None:
    """A download with no published sha256 records its own (``NAME.sha256``); a copy that
    was damaged later is not reused as "verified" but downloaded again."""
    body = os.urandom(100_000)
    file_server.files["data.zip"] = body
    dest = tmp_path / "downloads/data.zip"
    url = f"{file_server.url}/data.zip"
    download(url, dest, size=None, sha256=None, limit=MB)
    assert dest.read_bytes() == body and dest.with_name("data.zip.sha256").is_file()
    download(url, dest, size=None, sha256=None, limit=MB)
    assert file_server.requests == ["data.zip"]  # the verified copy was reused
    damaged = bytearray(body)
    damaged[500] ^= 0xFF
    dest.write_bytes(bytes(damaged))  # same size, other bytes
    download(url, dest, size=None, sha256=None, limit=MB)
    assert file_server.requests == ["data.zip", "data.zip"]
    assert dest.read_bytes() == body


@pytest.mark.slow
def test_cli_prepare_refuses_an_unbounded_download_in_one_line(
    tmp_path: Path, file_server: FileServer
) -> None:
    """``cyclegan prepare`` from a URL that streams past ``data.max_archive_bytes``: exit 2,
    one line naming the bound, no partial download kept, nothing prepared."""
    url = f"{file_server.url}/stream/{64 * MB}/big.zip"
    r = run(["prepare", "--set", f"data.source={url}", "--set", "data.max_archive_bytes=1000000"],
            tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "larger than data.max_archive_bytes=1000000" in error_line(r.stderr, "prepare")
    downloads = tmp_path / "data/raw/downloads"
    assert not downloads.exists() or list(downloads.iterdir()) == []
    assert not (tmp_path / "data/prepared").exists()


# ---------------------------------------------------------------------------------------------
# A full disk, temporary files, permissions
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint(tmp_path: Path, empty_store: Path) -> None:
    """The checkpoints folder on a real 400 KB filesystem (a checkpoint is ~1 MB): exit 1,
    one line naming the file and the free space, no partial or temporary file, the MLflow run
    FAILED."""
    work = project(tmp_path / "p", empty_store)
    with small_tmpfs(tmp_path / "full", "400k") as full:
        r = run([*train_args("train.max_steps=6"), "--checkpoints-dir", str(full)], work)
        assert r.returncode == 1, r.stderr
        line = error_line(r.stderr, "train")
        assert f"no space left on the device while writing {full}/step_00000003.pt" in line
        assert "the previous file is kept" in line
        assert list(full.iterdir()) == []
    run_id = json.loads((work / "models/cyclegan/run.json").read_text())["run_id"]
    assert run_status(work / "mlruns.db", run_id) == {run_id: "FAILED"}


@pytest.mark.slow
def test_disk_full_while_writing_the_model(tmp_path: Path, empty_store: Path) -> None:
    """The model folder on a real 200 KB filesystem (one generator is 128 KB, so the second
    does not fit): exit 1, one line naming the file, no temporary file, and no model.json, so
    the folder is never taken for a complete model."""
    work = project(tmp_path / "p", empty_store)
    with small_tmpfs(tmp_path / "full", "200k") as full:
        r = run([*train_args("train.max_steps=2"), "--model-dir", str(full)], work)
        assert r.returncode == 1, r.stderr
        line = error_line(r.stderr, "train")
        assert f"no space left on the device while writing {full}/G_B.safetensors" in line
        assert temp_files(full) == []
        with pytest.raises(ModelError, match="not a model folder"):
            read_model_json(full)


@pytest.mark.slow
def test_read_only_output_folders_are_one_line(tmp_path: Path, empty_store: Path) -> None:
    """The model folder, then the checkpoints folder, on a read-only filesystem: exit 1, one
    line naming the file that cannot be written; the MLflow run that training had opened
    ends FAILED, never left RUNNING."""
    work = project(tmp_path / "p", empty_store)
    with small_tmpfs(tmp_path / "ro", "100k", readonly=True) as ro:
        for flag, name in (("--model-dir", "run.json"), ("--checkpoints-dir", "step_00000003.pt")):
            r = run([*train_args("train.max_steps=4"), flag, str(ro)], work)
            assert r.returncode == 1, r.stderr
            line = error_line(r.stderr, "train")
            assert f"cannot write {ro}/{name}: Read-only file system" in line, line
    statuses = run_status(work / "mlruns.db")
    assert len(statuses) == 2 and set(statuses.values()) == {"FAILED"}, statuses


def test_cli_register_refuses_a_damaged_eval_json(tmp_path: Path) -> None:
    """``metrics/eval.json`` that is not JSON: exit 2, one line (was a traceback)."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text('{"fid_A2B": 1')
    r = run(["register"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "metrics/eval.json is not valid JSON" in only_line(r.stderr, "register")


@pytest.mark.slow
def test_stale_temp_files_are_removed_and_outputs_are_0644(
    tmp_path: Path, empty_store: Path
) -> None:
    """Temporary files left by a killed write (their process is gone) in the checkpoints and
    model folders are removed when training starts, with a message; one whose writer is alive
    is left alone. Every file training writes is 0644 under umask 022 (mkstemp's 0600 made
    model files unreadable to others on a shared volume)."""
    work = project(tmp_path / "p", empty_store)
    ck, md = work / "checkpoints", work / "models/cyclegan"
    md.mkdir(parents=True)
    ck.mkdir()
    gone = dead_pid()
    stale = [ck / f".step_00000099.pt.{gone}-0badc0de.tmp", md / f".G_A.safetensors.{gone}.tmp"]
    live = ck / f".step_00000098.pt.{os.getpid()}.tmp"  # a write in progress elsewhere
    for p in (*stale, live):
        p.write_bytes(b"\0" * 1000)
    old = os.umask(0o022)
    try:
        r = run(train_args("train.max_steps=4"), work)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in stale) and live.exists()
    for p in stale:
        assert f"removed {p.relative_to(work)} (1000 B) left by an interrupted write" in r.stderr
    written = [
        p
        for folder in (ck, md, work / "metrics", work / "plots")
        for p in folder.rglob("*")
        if p.is_file() and p != live
    ]
    assert len(written) >= 8
    modes = {str(p.relative_to(work)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {"0o644"}, modes


# ---------------------------------------------------------------------------------------------
# An unreachable tracking server
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_command_finds_an_unreachable_server_in_seconds(
    tmp_path: Path, model_dir: Path
) -> None:
    """Against a server that accepts connections and never answers (hung), train,
    translate (models:/), export (models:/) and register each fail in seconds, not minutes,
    with one line naming the server (exit 1); evaluate, which works offline, finishes and
    says in one line that MLflow is unreachable. (Before, MLflow's client retried for
    minutes.) The commands run side by side, each in a folder of its own."""
    model = ["--model", "models:/cyclegan@champion"]
    commands = {
        "train": train_args(),
        "translate": ["translate", *model, "--input", "data/prepared/testA", "--output", "o"],
        "export": ["export", *model, "--output", "onnx"],
        "register": ["register"],
        "evaluate": ["evaluate", *sets("evaluate.kid_subset_size=2", "evaluate.kid_subsets=2")],
    }
    works = {}
    for name in commands:
        work = works[name] = project(tmp_path / name)
        (work / "metrics").mkdir()
        (work / "metrics/eval.json").write_text(json.dumps({"fid_A2B": 50.0}))
        (work / "models").mkdir()
        (work / "models/cyclegan").symlink_to(model_dir)
    with hung_server() as uri:
        env = user_env(MLFLOW_TRACKING_URI=uri)
        clis = {name: Cli(args, works[name], env) for name, args in commands.items()}
        try:
            codes = {name: cli.wait(120) for name, cli in clis.items()}
            ended = time.monotonic()
        finally:
            for cli in clis.values():
                if cli.proc.poll() is None:
                    cli.kill()
    for name, cli in clis.items():
        took = max(t for t, _ in cli.err) - cli.started if cli.err else ended - cli.started
        if name == "evaluate":
            assert codes[name] == 0, cli.stderr
            assert f"MLflow at {uri} is unreachable" in cli.stderr
            assert (works[name] / "metrics/eval.json").read_text() != '{"fid_A2B": 50.0}'
            continue
        assert codes[name] == 1, (name, cli.stderr)
        line = only_line(cli.stderr, name)
        assert uri in line and "unreachable" in line, line
        assert took < 20, f"{name} took {took:.0f}s"
    assert not (works["train"] / "checkpoints").exists()
    assert not (works["translate"] / "o").exists()


# ---------------------------------------------------------------------------------------------
# translate never overwrites what is not its own
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(("a.png", "b.jpg", "c.png")):
        Image.new("RGB", (12, 10), (40 * i, 90, 200)).save(folder / name)
    return folder


def test_cli_translate_refuses_its_input_folder_as_output(model_dir: Path, images: Path) -> None:
    """``--output`` equal to ``--input``: exit 2, one line, every input byte unchanged (it
    used to overwrite each input with its translation)."""
    before = _folder_state(images)
    r = run(["translate", "--model", str(model_dir), "--input", str(images), "--output",
             str(images)], images.parent)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "is the input folder" in only_line(r.stderr, "translate")
    assert _folder_state(images) == before


def test_translate_output_inside_or_linked_to_the_input_is_refused(
    model_dir: Path, images: Path
) -> None:
    """An output folder inside the input folder, or a symlink to it, is refused too."""
    (images.parent / "link").symlink_to(images)
    before = _folder_state(images)
    for out in (images / "sub", images.parent / "link", images / ".." / "in"):
        with pytest.raises(InputError, match="input folder"):
            translate(model_dir, input_path=images, output_dir=out, device="cpu")
    assert _folder_state(images) == before and not (images / "sub").exists()


def test_translate_never_replaces_a_foreign_file_without_overwrite(
    model_dir: Path, images: Path, tmp_path: Path
) -> None:
    """A file in the output folder that translate did not write and would replace: refused
    before anything is written (not even the other outputs); ``--overwrite`` replaces it.
    Its own earlier outputs are replaced without asking. Outputs are 0644 PNGs tagged as
    translate's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"my own notes, not an image")
    with pytest.raises(InputError, match="not written by cyclegan translate"):
        translate(model_dir, input_path=images, output_dir=out, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["b.png"]
    assert (out / "b.png").read_bytes() == b"my own notes, not an image"

    old = os.umask(0o022)
    try:
        translate(model_dir, input_path=images, output_dir=out, device="cpu", overwrite=True)
        translate(model_dir, input_path=images, output_dir=out, device="cpu")  # its own: fine
    finally:
        os.umask(old)
    for name in ("a.png", "b.png", "c.png"):
        with Image.open(out / name) as im:
            assert im.info["Software"].startswith(SOFTWARE_TAG)
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644
