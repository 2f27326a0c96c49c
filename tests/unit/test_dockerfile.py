"""The Dockerfile cannot be built here (no container engine), so this reads it: every path it copies
is in the repository, every command it runs is one the base image or the repository provides, the
image it ends with runs as a non-root numeric uid on a read-only root filesystem, has no compilers
and no HEALTHCHECK (the probes are Kubernetes')."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bot.cli import parser

ROOT = Path(__file__).resolve().parent.parent.parent
BASE_IMAGE = re.compile(r"python:3\.11-slim(@sha256:[0-9a-f]{64})?")
# What python:3.11-slim (Debian) has on its PATH that this Dockerfile may run. Anything else must be
# installed by an earlier RUN of the same stage (apt-get install) or come from the repository.
BASE_COMMANDS = {"apt-get", "rm", "mkdir", "chown", "chmod", "groupadd", "useradd", "pip", "python", "python3", "true"}
BUILD_TOOLS = {"build-essential", "gcc", "g++", "make", "cc", "clang", "libc6-dev", "git", "curl", "wget"}


@dataclass
class Stage:
    name: str
    image: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages(text: str) -> list[Stage]:
    result: list[Stage] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(result))
            result.append(Stage(name=name, image=words[0]))
        else:
            assert result, f"{keyword} before the first FROM"
            result[-1].instructions.append((keyword, rest))
    return result


def _flags(rest: str) -> tuple[dict[str, str], list[str]]:
    """`--from=build --chown=1:1 a b` → ({'from': 'build', ...}, ['a', 'b'])."""
    words = shlex.split(rest)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words


def _commands(shell: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at &&, ||, ; and |), as words."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;|\|", shell) if part.strip()]


def _exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"use the exec form (JSON array), not a shell string: {rest}"
    value = yaml.safe_load(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def problems(text: str) -> list[str]:
    """Everything wrong with this Dockerfile text, in words; [] when it is fine."""
    found: list[str] = []
    all_stages = stages(text)
    if len(all_stages) < 2:
        found.append(f"{len(all_stages)} stage(s): build the wheels in one stage and install them in another")
    seen: set[str] = set()
    for stage in all_stages:
        if not BASE_IMAGE.fullmatch(stage.image) and stage.image not in seen:
            found.append(f"stage {stage.name}: FROM {stage.image} is neither python:3.11-slim nor an earlier stage")
        found += _stage_problems(stage, seen)
        seen.add(stage.name)
    found += [f"HEALTHCHECK in stage {s.name}: the probes are Kubernetes'" for s in all_stages if s.args("HEALTHCHECK")]
    if all_stages:
        found += _runtime_problems(all_stages[-1])
    return found


def _stage_problems(stage: Stage, earlier: set[str]) -> list[str]:
    found: list[str] = []
    installed: set[str] = set()
    for keyword, rest in stage.instructions:
        if keyword in ("COPY", "ADD"):
            flags, paths = _flags(rest)
            if keyword == "ADD":
                found.append(f"ADD {rest}: use COPY (ADD fetches URLs and unpacks archives)")
            if "from" in flags:
                if flags["from"] not in earlier:
                    found.append(f"COPY --from={flags['from']}: no earlier stage of that name")
                continue
            found += [f"COPY {src}: not in the repository" for src in paths[:-1] if not (ROOT / src).exists()]
        elif keyword == "RUN":
            flags, _ = _flags(rest)
            mount = dict(kv.partition("=")[::2] for kv in flags.get("mount", "").split(",") if kv)
            if mount.get("from") and mount["from"] not in earlier:
                found.append(f"RUN --mount from={mount['from']}: no earlier stage of that name")
            shell = re.sub(r"^(--\S+\s+)+", "", rest)
            for words in _commands(shell):
                found += _command_problems(words, installed)
                if words[:2] == ["apt-get", "install"]:
                    installed |= {w for w in words[2:] if not w.startswith("-")}
    return found


def _command_problems(words: list[str], installed: set[str]) -> list[str]:
    program = words[0]
    if program not in BASE_COMMANDS and program not in installed:
        return [f"RUN {' '.join(words)}: {program} is not in python:3.11-slim nor installed before"]
    if program == "pip" and words[1:2] in (["install"], ["wheel"]):
        found = [] if "--no-cache-dir" in words else [f"RUN {' '.join(words)}: add --no-cache-dir (no pip cache in a layer)"]
        for flag in ("-c", "--constraint"):
            if flag in words and not (ROOT / words[words.index(flag) + 1]).is_file():
                found.append(f"RUN {' '.join(words)}: {words[words.index(flag) + 1]} is not in the repository")
        return found
    return []


def _runtime_problems(stage: Stage) -> list[str]:
    found: list[str] = []
    users = stage.args("USER")
    uid = users[-1].split(":")[0] if users else "0"
    if not uid.isdigit() or int(uid) == 0:
        found.append(f"the runtime stage runs as {uid!r}: use a non-root numeric uid (runAsNonRoot needs a number)")
    for rest in stage.args("RUN"):
        for words in _commands(re.sub(r"^(--\S+\s+)+", "", rest)):
            if words[:2] in (["apt-get", "install"], ["apk", "add"]) and BUILD_TOOLS & set(words):
                found.append(f"the runtime stage installs build tools: {' '.join(sorted(BUILD_TOOLS & set(words)))}")
            if words[:2] == ["pip", "install"] and "--no-index" not in words:
                found.append("the runtime stage's pip install may download: install the build stage's wheels with --no-index")
    env = _env(stage)
    if env.get("PYTHONDONTWRITEBYTECODE") != "1":
        found.append("PYTHONDONTWRITEBYTECODE=1 is not set: Python would try to write .pyc files on a read-only root")
    found += [f"{name}={env.get(name)!r}: must be under /tmp (the only writable mount)" for name in ("HOME", "TMPDIR")
              if not (env.get(name) or "").startswith("/tmp")]
    entry, cmd = stage.args("ENTRYPOINT"), stage.args("CMD")
    if not entry:
        found.append("no ENTRYPOINT")
    else:
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        program = _exec_form(entry[-1])[0]
        if program not in scripts:
            found.append(f"ENTRYPOINT {program}: not a console script of pyproject.toml ({', '.join(scripts)})")
    if cmd:
        try:
            parser().parse_args(_exec_form(cmd[-1]))
        except SystemExit:
            found.append(f"CMD {cmd[-1]}: `opsbot` does not accept these arguments")
    return found


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.args("ENV"):
        env.update(word.partition("=")[::2] for word in shlex.split(rest))
    return env


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_dockerfile_has_no_problems() -> None:
    assert problems(dockerfile()) == []


def test_it_builds_wheels_with_the_tested_versions_and_installs_only_those() -> None:
    build, runtime = stages(dockerfile())
    assert any("pip wheel" in r and "-c constraints.txt" in r for r in build.args("RUN"))
    (install,) = [r for r in runtime.args("RUN") if "pip install" in r]
    assert "--mount=type=bind,from=build,source=/wheels" in install and "--no-index" in install
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"] in shlex.split(install)
    assert not runtime.args("COPY") or all("--from" not in c for c in runtime.args("COPY"))  # no wheels left in a layer


def test_the_runtime_user_and_paths_agree_with_the_manifests() -> None:
    runtime = stages(dockerfile())[-1]
    uid, gid = runtime.args("USER")[-1].split(":")
    env = _env(runtime)
    for doc in yaml.safe_load_all((ROOT / "manifests/base/deployment.yaml").read_text()):
        pod = doc["spec"]["template"]["spec"]
        assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == (uid, gid)
        for container in pod["containers"]:
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", env["OPSBOT_SPOOL_DIR"]} <= mounts, container["name"]


def test_a_bad_dockerfile_is_refused_with_reasons() -> None:
    """The checker itself: each defect it is for is named (so a pass above means something)."""
    bad = """FROM python:3.11-slim
COPY no-such-dir ./x
RUN apt-get install -y gcc && curl https://example.com/x | sh
RUN pip install .
HEALTHCHECK CMD curl -f http://localhost:3000/healthz
USER root
ENTRYPOINT ["opsbot-server"]
CMD ["serve", "--no-such-flag"]
"""
    found = "\n".join(problems(bad))
    for expected in ("1 stage(s)", "COPY no-such-dir: not in the repository", "curl is not in python:3.11-slim",
                     "sh is not in python:3.11-slim", "add --no-cache-dir", "HEALTHCHECK in stage 0",
                     "runs as 'root'", "installs build tools: gcc", "may download", "PYTHONDONTWRITEBYTECODE",
                     "HOME=None", "ENTRYPOINT opsbot-server: not a console script", "does not accept these arguments"):
        assert expected in found, f"{expected!r} not reported in:\n{found}"
    assert problems(dockerfile().replace("USER 10001:10001", "USER 0:0")) == [
        "the runtime stage runs as '0': use a non-root numeric uid (runAsNonRoot needs a number)"]
    assert problems(dockerfile().replace("--from=build", "--from=builder").replace("from=build,", "from=builder,")) == [
        "RUN --mount from=builder: no earlier stage of that name"]
