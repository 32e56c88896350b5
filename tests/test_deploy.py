"""The deployment files run as written: compose's Redis and server commands started here as compose would start them
(no Docker daemon needed), promotions surviving eviction, replicas following a promotion without a restart."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tomllib
import yaml

from querytune.serving.cache import Entry, open_cache
from querytune.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "serving" / "compose.yaml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:?message} / ${VAR:-default} / $$ rules, enough for this file."""

    def one(m):
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if name in env and env[name]:
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""

    return re.sub(r"\$\{(\w+)(:\?|:-)?([^}]*)\}", one, value).replace("$$", "$")


def start_redis(tmp_path, env) -> tuple[subprocess.Popen, int]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; `make test` checks for it)")
    svc = COMPOSE["services"]["redis"]
    command = interpolate(svc["command"][2], env).replace(
        "--maxmemory 1gb", "--maxmemory 3mb"
    )  # small, to see eviction
    port = free_port()
    proc = subprocess.Popen(
        ["sh", "-c", f"{command} --port {port} --bind 127.0.0.1 --dir {tmp_path}"],
        env={**os.environ, **{k: interpolate(v, env) for k, v in svc["environment"].items()}},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        r = subprocess.run(
            ["redis-cli", "-p", str(port), "-a", env["REDIS_PASSWORD"], "--no-auth-warning", "ping"],
            capture_output=True,
            text=True,
        )
        if r.stdout.strip() == "PONG":
            break
        time.sleep(0.05)
    return proc, port


def test_compose_refuses_to_start_without_secrets():
    svc = COMPOSE["services"]["querytune"]
    with pytest.raises(KeyError, match="QUERYTUNE_API_KEY"):
        interpolate(svc["environment"]["QUERYTUNE_API_KEY"], {})
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(svc["environment"]["QUERYTUNE_CACHE_URL"], {})


def test_redis_as_composed_keeps_promotions_when_it_evicts_and_wants_its_password(tmp_path):
    env = {"REDIS_PASSWORD": "pw-test"}
    proc, port = start_redis(tmp_path, env)
    try:
        url = interpolate(COMPOSE["services"]["querytune"]["environment"]["QUERYTUNE_CACHE_URL"], env).replace(
            "@redis:6379", f"@127.0.0.1:{port}"
        )
        cache = open_cache(url)
        cache.promote("m1", "/models/sft", "s1")
        cache.promote("m2", "/models/dpo", "s1")
        big = {"intent": "find_business", "slots": {"name": "x" * 2000}}
        for start in range(0, 6000, 500):  # ~12 MB of entries into a 3 MB Redis
            cache.put_many([(f"query {i}", Entry(big, True, 0.9, "m2")) for i in range(start, start + 500)], "s1")
        info = cache.client.info("stats")
        assert info["evicted_keys"] > 0, "entries were evicted"
        assert cache.active()["model_dir"] == "/models/dpo" and cache.rollback()["model_dir"] == "/models/sft", (
            "the history survived"
        )
        from querytune.serving.cache import CacheUnavailable

        with pytest.raises(CacheUnavailable, match="(?i)auth"):
            open_cache(f"redis://127.0.0.1:{port}/0").active()
        assert "pw-test" not in cache.url, "the password never reaches messages"
    finally:
        proc.kill()
        proc.wait()


def test_the_server_as_composed_follows_a_promotion_without_a_restart(tiny_model, tmp_path):
    env = {"REDIS_PASSWORD": "pw-test", "QUERYTUNE_API_KEY": "key-test"}
    proc, port = start_redis(tmp_path, env)
    server = None
    try:
        svc = COMPOSE["services"]["querytune"]
        server_env = {k: interpolate(str(v), env) for k, v in svc["environment"].items()}
        server_env["QUERYTUNE_CACHE_URL"] = server_env["QUERYTUNE_CACHE_URL"].replace(
            "@redis:6379", f"@127.0.0.1:{port}"
        )
        server_env |= {
            "QUERYTUNE_FALLBACK_LOG": str(tmp_path / "fallback.jsonl"),
            "QUERYTUNE_MODEL_CACHE": str(tmp_path / "qtcache"),
            "QUERYTUNE_WATCH_PROMOTIONS": "0.5",
            "OMP_NUM_THREADS": "1",
        }
        second = Path(shutil.copytree(tiny_model, tmp_path / "models" / "dpo"))
        qt = str(Path(sys.executable).parent / "querytune")
        env_all = {**os.environ, **server_env}
        r = subprocess.run(
            [qt, "cache", "promote", "--model", str(tiny_model), "--force"], env=env_all, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        http_port = free_port()
        command = [c.replace("8000", str(http_port)) for c in svc["command"]]
        log = open(tmp_path / "server.log", "w")
        server = subprocess.Popen([qt, *command], env=env_all, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{http_port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(f"{base}/v1/parse", params={"q": "pizza"}).status_code == 401, "the key is required"
        assert (
            httpx.get(
                f"{base}/v1/parse", params={"q": "pizza"}, headers={"X-API-Key": "key-test"}, timeout=30
            ).status_code
            == 200
        )
        r = subprocess.run(
            [qt, "cache", "promote", "--model", str(second), "--force"], env=env_all, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        for _ in range(100):
            if f"now serving {second}" in (tmp_path / "server.log").read_text():
                break
            time.sleep(0.2)
        assert f"now serving {second}" in (tmp_path / "server.log").read_text()
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
    finally:
        if server:
            server.kill()
            server.wait()
        proc.kill()
        proc.wait()


def test_the_images_run_unprivileged_with_a_health_check_and_no_trainers():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("Dockerfile", "Dockerfile.vllm"):
        text = (ROOT / "serving" / name).read_text()
        assert re.search(r"^USER (?!root)\w+", text, re.M) and "HEALTHCHECK" in text and "/healthz" in text
        assert "trl" not in text and "[train" not in text
        assert "COPY pyproject.toml README.md LICENSE" in text  # pyproject's license-files: the build needs it
    # the vLLM image installs querytune --no-deps beside vLLM's own stack: every pin of the serve extra by hand
    vllm_image = (ROOT / "serving" / "Dockerfile.vllm").read_text()
    assert all(f"'{pin}'" in vllm_image for pin in extras["serve"] if "==" in pin), extras["serve"]
    installed = re.search(r"'\.\[([\w,]+)\]'", (ROOT / "serving" / "Dockerfile").read_text()).group(1).split(",")
    assert set(installed) <= set(extras) and not any("trl" in d for x in installed for d in extras[x])
