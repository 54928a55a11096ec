"""Build the CPU runtime image with podman on this machine, and run its smoke test (``make image``).

No public image registry is needed: the base image is Debian bookworm (Python 3.11, like the project's wheels)
made with ``debootstrap --variant=minbase`` and ``podman import``, then containers/Dockerfile.cpu builds on it
with ``--build-arg PYTHON_IMAGE=<that base>``. pip inside the build uses what the host's pip is configured with
(``pip config list``): its CA bundle and its local wheel folder are mounted into the build, never copied into a
layer, and torch comes from that folder when it holds the CPU wheel.

podman runs rootful with the runc runtime and the settings in a ``containers.conf`` of ours
(``build/container/containers.conf``, pointed at by ``CONTAINERS_CONF``): default ulimits no higher than this
machine's hard limits, which podman would otherwise refuse. Unchanged sources build from podman's layer cache.

    python containers/image.py build [--image localhost/preftune:0.1.0-cpu]
    python containers/image.py smoke [--image ...]
    python containers/image.py conf          # print the CONTAINERS_CONF path (written if missing)

Only the standard library: it runs before (and without) the project venv.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / "build" / "container"
IMAGE = "localhost/preftune:0.1.0-cpu"
BASE = "localhost/preftune-base:bookworm"
BUILDER = "localhost/preftune-builder:cache"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3")
#: Trimmed from the base: apt's package lists and caches, documentation and translations.
TRIM = ("var/cache/apt/*", "var/lib/apt/lists/*", "usr/share/doc/*", "usr/share/man/*", "usr/share/locale/*")
#: Where the build finds the host's CA bundle and wheel folder (mounted read-only, only during the build).
BUILD_CA = "/run/preftune-build/ca.crt"
BUILD_WHEELS = "/run/preftune-build/wheels"
#: An arbitrary non-root UID (OpenShift-style) the smoke test also runs as, in group 0 like the image's user.
ARBITRARY_UID = "1234567"
#: What the build reads: the .dockerignore allow-list (tests/test_containers.py keeps them equal) and the Dockerfile.
CONTEXT = (
    "pyproject.toml",
    "README.md",
    "src",
    "components",
    "pipelines",
    "examples",
    "containers/requirements.lock",
)
DOCKERFILE = "containers/Dockerfile.cpu"
#: Never sent to the builder (.dockerignore), so never part of the digest either.
IGNORED = ("__pycache__", ".pyc", ".egg-info", ".ipynb_checkpoints", ".DS_Store")


def log(message: str) -> None:
    print(f"[image] {message}", flush=True)


# ------------------------------------------------------------------------------------------------- podman


def containers_conf() -> Path:
    """Our containers.conf: the runc runtime, and default ulimits within this machine's hard limits."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else min(nofile, 1048576)
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    text = (
        "# written by containers/image.py: podman settings that work on this machine\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    path = STATE / "containers.conf"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf())}


def podman(
    *args: str, timeout: float = 600, capture: bool = False, check: bool = True
) -> subprocess.CompletedProcess:
    """One podman command with our settings; its output in this log unless captured."""
    return subprocess.run(
        ["podman", *args],
        env=podman_env(),
        timeout=timeout,
        check=check,
        text=True,
        capture_output=capture,
    )


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False, capture=True).returncode == 0


def image_size(name: str) -> int:
    """Bytes of the image's layers."""
    out = podman("image", "inspect", "--format", "{{.Size}}", name, capture=True).stdout
    return int(out.strip())


@contextlib.contextmanager
def podman_service(directory: Path, timeout: float = 60) -> Iterator[str]:
    """podman's Docker-compatible API on a unix socket in ``directory``; yields its ``unix://`` URL."""
    socket = directory / "podman.sock"
    url = f"unix://{socket}"
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", url],
        env=podman_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while not socket.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"podman system service exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not open {socket} within {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# --------------------------------------------------------------------------------------------------- base


def make_base(name: str = BASE) -> None:
    """A Debian bookworm minbase with Python 3.11 and venv, imported into podman (kept once made)."""
    if image_exists(name):
        log(f"base image {name} exists")
        return
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="preftune-rootfs-", dir=STATE.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        include = ",".join(BASE_PACKAGES)
        log(f"debootstrap --variant=minbase {SUITE} (+{include})")
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={include}", SUITE, str(rootfs), MIRROR],
            check=True,
            timeout=1800,
            stdout=subprocess.DEVNULL,
        )
        for pattern in TRIM:
            for path in rootfs.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "--change", 'CMD ["python3"]', "-", name],
            stdin=tar.stdout,
            env=podman_env(),
            check=True,
            timeout=600,
            stdout=subprocess.DEVNULL,
        )
        if tar.wait(timeout=60) != 0:
            raise RuntimeError("tar of the base root file system failed")
    log(f"base image {name} made in {time.monotonic() - start:.0f} s")


# -------------------------------------------------------------------------------------------------- build


def pip_sources() -> tuple[Path | None, Path | None]:
    """The CA bundle and local wheel folder the host's pip is configured with (``pip config list``)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        value = value.strip().strip("'\"")
        if name in ("cert", "find-links") and value:
            found[name] = value.split()[0]
    ca = Path(found["cert"]) if "cert" in found else None
    wheels = Path(found["find-links"]) if "find-links" in found else None
    return (ca if ca and ca.is_file() else None), (wheels if wheels and wheels.is_dir() else None)


def build_arguments(base: str) -> list[str]:
    """podman build's mounts and build arguments for this machine's pip configuration."""
    ca, wheels = pip_sources()
    args = ["--build-arg", f"PYTHON_IMAGE={base}"]
    if ca:
        args += ["-v", f"{ca}:{BUILD_CA}:ro", "--build-arg", f"PIP_CA_BUNDLE={BUILD_CA}"]
    if wheels:
        args += ["-v", f"{wheels}:{BUILD_WHEELS}:ro", "--build-arg", f"LOCAL_WHEELS={BUILD_WHEELS}"]
        if any(wheels.glob("torch-*+cpu-*.whl")):
            args += ["--build-arg", "TORCH_INDEX_URL="]  # the CPU wheel on disk, not the PyTorch index
    return args


def context_digest(arguments: Sequence[str]) -> str:
    """A digest of everything the build reads: the context's files, the Dockerfile and the build arguments."""
    digest = hashlib.sha256("\0".join(arguments).encode())
    paths = [ROOT / DOCKERFILE]
    for name in CONTEXT:
        root = ROOT / name
        paths += sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for path in paths:
        relative = path.relative_to(ROOT).as_posix()
        if any(part in relative for part in IGNORED):
            continue
        digest.update(relative.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def image_id(name: str) -> str:
    return podman("image", "inspect", "--format", "{{.Id}}", name, capture=True).stdout.strip()


def build(image: str = IMAGE, base: str = BASE) -> float:
    """Build containers/Dockerfile.cpu as ``image``; returns the seconds it took.

    Nothing to do when neither the context, the Dockerfile, the build arguments nor the base changed since
    ``image`` was built (podman's layer cache would take a minute or two to find that out itself).
    """
    make_base(base)
    start = time.monotonic()
    common = ["build", "--isolation", "chroot", "--network", "host", "-f", DOCKERFILE]
    common += build_arguments(base)
    key = f"{context_digest(common)} {image_id(base)}"
    stamp = STATE / "build.json"
    if image_exists(image) and stamp.is_file():
        built = json.loads(stamp.read_text(encoding="utf-8"))
        if built.get("key") == key and built.get("image_id") == image_id(image):
            log(f"{image} is up to date (nothing it is built from changed)")
            return time.monotonic() - start
    os.chdir(ROOT)
    # the builder stage tagged too, so removing dangling images below never drops its cache
    podman(*common, "--target", "builder", "-t", BUILDER, ".", timeout=3600)
    podman(*common, "-t", image, ".", timeout=3600)
    podman("image", "prune", "--force", capture=True)  # earlier builds' untagged images
    stamp.write_text(json.dumps({"key": key, "image_id": image_id(image)}), encoding="utf-8")
    seconds = time.monotonic() - start
    log(f"built {image} in {seconds:.0f} s; {image_size(image) / 1e9:.2f} GB")
    return seconds


# -------------------------------------------------------------------------------------------------- smoke


def run_in_image(
    image: str, argv: Sequence[str], *, user: str | None = None, extra: Sequence[str] = ()
) -> str:
    """Run ``argv`` in a fresh container of ``image``; returns its output (fails on a non-zero exit)."""
    args = ["run", "--rm", "--network", "none", *extra]
    if user:
        args += ["--user", user]
    done = podman(*args, image, *argv, capture=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed in {image} ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def smoke(image: str = IMAGE, force: bool = False) -> dict:
    """Run containers/smoke_test.py in the image as its own user, then as an arbitrary UID with one CPU.

    An image that passed (same image id, same smoke test) is not tested again unless ``force``.
    """
    script = ROOT / "containers" / "smoke_test.py"
    tested = image_id(image)
    key = f"{tested} {hashlib.sha256(script.read_bytes()).hexdigest()}"
    stamp = STATE / "smoke-passed.json"
    if not force and stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("key") == key:
        log(f"smoke test already passed for {image} ({tested[:12]})")
        return json.loads(stamp.read_text(encoding="utf-8"))["result"]
    mount = ["-v", f"{script}:/opt/smoke_test.py:ro"]
    start = time.monotonic()
    own = json.loads(run_in_image(image, ["python", "/opt/smoke_test.py"], extra=mount).splitlines()[-1])
    other = json.loads(
        run_in_image(
            image,
            ["python", "/opt/smoke_test.py", "--quick", "--expect-threads", "1"],
            user=f"{ARBITRARY_UID}:0",
            extra=[*mount, "--cpus", "1"],
        ).splitlines()[-1]
    )
    if own["uid"] == 0 or other["uid"] != int(ARBITRARY_UID):
        raise RuntimeError(f"unexpected users: {own['uid']} and {other['uid']}")
    result = {"image": own, "arbitrary_uid": other}
    log(f"smoke test passed in {time.monotonic() - start:.0f} s: {json.dumps(result)}")
    stamp.write_text(json.dumps({"key": key, "result": result}), encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python containers/image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "smoke", "conf"))
    parser.add_argument("--image", default=IMAGE, help=f"tag of the image (default {IMAGE})")
    parser.add_argument("--base", default=BASE, help=f"the Debian base image (default {BASE})")
    parser.add_argument("--force", action="store_true", help="smoke: test again an image that passed")
    args = parser.parse_args(argv)
    if args.command == "conf":
        print(containers_conf())
    elif args.command == "build":
        build(args.image, args.base)
    else:
        smoke(args.image, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
