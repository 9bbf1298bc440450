"""Runs a rendered container's entrypoint script here, as the kubelet would start it (command,
args, env), with a stand-in `meshserve` on PATH that records its argv and then idles until
SIGTERM (so the command lines the tests check are the ones the script really builds), or with
the real `meshserve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helm.chart import Rendered, container, env_of, expand

FAKE_MESHSERVE = """#!/bin/bash
printf '%s\\0' "$@" > "$POD_DIR/.argv.$$" && mv "$POD_DIR/.argv.$$" "$POD_DIR/argv.$$"
if [ -n "${FAKE_FAIL_RANK:-}" ] && [[ " $* " == *" --tp-rank $FAKE_FAIL_RANK "* ]]; then
  until [ "$(ls "$POD_DIR" | grep -c '^argv[.]')" -ge "$TP_SIZE" ]; do sleep 0.02; done
  exit 3  # once every rank has started
fi
trap 'exit 0' TERM
while :; do sleep 0.1; done
"""
# The real one, with the interpreter that runs the tests (the image's entrypoint is `meshserve`).
REAL_MESHSERVE = f"""#!/bin/bash
printf '%s\\0' "$@" > "$POD_DIR/.argv.$$" && mv "$POD_DIR/.argv.$$" "$POD_DIR/argv.$$"
exec "{sys.executable}" -m deploy.cli "$@"
"""
# The real one, with the pod DNS names of --workers stood in for by 127.0.0.1 (the ports stay):
# this machine has no cluster DNS.
REAL_MESHSERVE_LOCAL = f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
tmp = os.path.join(os.environ["POD_DIR"], f".argv.{{os.getpid()}}")
with open(tmp, "w") as f:
    f.write("".join(a + "\\0" for a in args))
os.rename(tmp, os.path.join(os.environ["POD_DIR"], f"argv.{{os.getpid()}}"))
if "--workers" in args:
    at = args.index("--workers") + 1
    args[at] = ",".join("127.0.0.1:" + a.rsplit(":", 1)[1] for a in args[at].split(","))
os.execv(sys.executable, [sys.executable, "-m", "deploy.cli", *args])
"""


@dataclass
class Pod:
    proc: subprocess.Popen
    pod_dir: Path

    def pids(self) -> list[int]:
        """Every `meshserve` process started so far."""
        return sorted(int(p.suffix[1:]) for p in self.pod_dir.glob("argv.*"))

    def argvs(self) -> list[list[str]]:
        """argv (after `meshserve`) of every process started so far, by pid."""
        files = [self.pod_dir / f"argv.{pid}" for pid in self.pids()]
        return [p.read_bytes().decode().split("\0")[:-1] for p in files]

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[list[str]]:
        deadline = time.monotonic() + timeout_s
        while len(self.argvs()) < count:
            assert time.monotonic() < deadline, f"{len(self.argvs())} of {count} processes"
            time.sleep(0.02)
        return self.argvs()

    def stop(self, timeout_s: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_worker_pod(rendered: Rendered, statefulset: str, ordinal: int, tmp: Path,
                     fail_rank: int | None = None, real_env: dict[str, str] | None = None) -> Pod:
    """Starts pod `<statefulset>-<ordinal>`'s worker container here: with the stand-in
    `meshserve` (whose rank `fail_rank` exits 3 at once), or, given `real_env` (overrides of the
    container's env), with the real one, its output in <tmp>/<pod>/log."""
    sts = rendered.get("StatefulSet", statefulset)
    return _start(rendered, sts["spec"]["template"]["spec"], "worker", f"{statefulset}-{ordinal}",
                  {}, tmp, fail_rank=fail_rank, real_env=real_env)


def start_lws_pod(rendered: Rendered, lws: str, group: int, index: int, tmp: Path,
                  scripts: dict[str, str] | None = None,
                  real_env: dict[str, str] | None = None) -> Pod:
    """Starts pod `index` of group `group` of LeaderWorkerSet `lws` here, with the stand-in
    `meshserve` and the environment the LeaderWorkerSet controller gives its pods: index 0 is
    the leader `<lws>-<group>` (its scheduler container), index s the worker `<lws>-<group>-<s>`.
    `scripts` replaces ConfigMap scripts by name (e.g. a wait for workers that returns); with
    `real_env` the real `meshserve` runs (pod DNS names in --workers stood in for by 127.0.0.1)."""
    template = rendered.get("LeaderWorkerSet", lws)["spec"]["leaderWorkerTemplate"]
    spec = (template["leaderTemplate"] if index == 0 else template["workerTemplate"])["spec"]
    name = f"{lws}-{group}" + (f"-{index}" if index else "")
    env = {"LWS_WORKER_INDEX": str(index), "LWS_GROUP_SIZE": str(template["size"]),
           "LWS_LEADER_ADDRESS": f"{lws}-{group}.{lws}"}
    return _start(rendered, spec, "scheduler" if index == 0 else "worker", name, env, tmp,
                  scripts=scripts, real_env=real_env,
                  real_meshserve=REAL_MESHSERVE_LOCAL if index == 0 else REAL_MESHSERVE)


def _start(rendered: Rendered, pod_spec: dict, container_name: str, pod_name: str,
           extra_env: dict[str, str], tmp: Path, fail_rank: int | None = None,
           real_env: dict[str, str] | None = None,
           scripts: dict[str, str] | None = None, real_meshserve: str = REAL_MESHSERVE) -> Pod:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == container_name]
    pod_dir = tmp / pod_name
    pod_dir.mkdir(parents=True)
    script = _scripts(rendered, pod_spec, c, pod_dir, scripts or {})
    # the stand-in runs with the container's env alone; the real one also needs this machine's
    env = {} if real_env is None else dict(os.environ)
    env.update(POD_NAME=pod_name, POD_IP="127.0.0.1")
    env.update(extra_env)
    if real_env is not None:
        env.update(real_env)
    for name, entry in env_of(c).items():  # in order: a value may name the ones before
        if "value" in entry:
            env[name] = expand([entry["value"]], env, strict=False)[0]
    bin_dir = pod_dir / "bin"
    bin_dir.mkdir()
    (bin_dir / "meshserve").write_text(FAKE_MESHSERVE if real_env is None else real_meshserve)
    (bin_dir / "meshserve").chmod(0o755)
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", POD_DIR=str(pod_dir))
    if fail_rank is not None:
        env["FAKE_FAIL_RANK"] = str(fail_rank)
    out = None
    if real_env is not None:
        out = open(pod_dir / "log", "wb")  # noqa: SIM115 (the child writes it)
    args = expand(c["args"], env, strict=False)
    proc = subprocess.Popen([c["command"][0], str(script), *args], env=env,
                            stdout=out, stderr=subprocess.STDOUT if out else None,
                            start_new_session=True)
    if out is not None:
        out.close()
    return Pod(proc, pod_dir)


def _scripts(rendered: Rendered, pod_spec: dict, c: dict, tmp: Path,
             replaced: dict[str, str]) -> Path:
    """Every file of the ConfigMap that holds the script the container's command names,
    written under tmp (scripts call each other by path); returns that script's path."""
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    path = Path(c["command"][1])
    (volume_name,) = [n for n, m in mounts.items() if path.parent == Path(m)]
    configmap = rendered.get("ConfigMap", volumes[volume_name]["configMap"]["name"])
    for name, text in {**configmap["data"], **replaced}.items():
        (tmp / name).write_text(text)
    return tmp / path.name
