"""Scorers that call a model: an OpenAI-compatible chat endpoint (a hosted API or a local inference
server), the OpenAI moderation endpoint, or a local Hugging Face classifier. Every answer is cached on
disk, keyed by sha256 of (backend, prompt, text) and written atomically, so a rerun or a second job asks
nothing twice. A call that fails (after retries) or an answer that does not parse returns None: the
caller counts it as unscored; it is never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from ipsweep.cache import atomic_write_json, read_json
from ipsweep.errors import ConfigError

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class Cache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def _path(self, backend: str, prompt: str, text: str) -> Path:
        key = hashlib.sha256(json.dumps([backend, prompt, text]).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.json"

    def get_or_call(self, backend: str, prompt: str, text: str, call):
        path = self._path(backend, prompt, text)
        hit = read_json(path)
        if hit is not None:
            return hit["value"]
        value = call()
        if value is not None:  # failures are retried next time, not cached
            atomic_write_json(path, {"backend": backend, "value": value})
        return value


def _api_key(api_key_env: str | None, base_url: str) -> str | None:
    key = os.environ.get(api_key_env) if api_key_env else None
    if key is None and api_key_env and not any(h in base_url for h in LOCAL_HOSTS):
        raise ConfigError(
            f"the judge at {base_url} needs an API key in ${api_key_env}; fix: export {api_key_env}=..., "
            "or point the judge's base_url at a local OpenAI-compatible server"
        )
    return key


class _Http:
    def __init__(self, base_url: str, api_key_env: str | None, timeout_s: float, retries: int):
        self.base_url, self.timeout_s, self.retries = base_url.rstrip("/"), timeout_s, retries
        self.api_key = _api_key(api_key_env, base_url)

    def post(self, path: str, payload: dict) -> dict | None:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        for attempt in range(self.retries + 1):
            try:
                r = httpx.post(
                    f"{self.base_url}{path}", json=payload, headers=headers, timeout=self.timeout_s
                )
                if r.status_code == 200:
                    return r.json()
                log.warning(
                    "judge %s%s answered %s (attempt %d)", self.base_url, path, r.status_code, attempt + 1
                )
            except (httpx.HTTPError, ValueError) as e:
                log.warning("judge %s%s failed: %s (attempt %d)", self.base_url, path, e, attempt + 1)
            if attempt < self.retries:  # back off before the next try, not after the last
                time.sleep(min(2**attempt, 10) * 0.1)
        return None


class ChatGrader:
    """Asks a chat model to grade `text` with `template` and reads an integer grade with `pattern`."""

    def __init__(
        self,
        cache: Cache,
        base_url: str,
        model: str,
        template: str,
        pattern: str,
        api_key_env: str | None = None,
        timeout_s: float = 60,
        retries: int = 3,
        temperature: float = 0.0,
    ):
        self.cache, self.model, self.template, self.pattern, self.temperature = (
            cache,
            model,
            template,
            pattern,
            temperature,
        )
        self.http = _Http(base_url, api_key_env, timeout_s, retries)
        self.name = f"chat:{base_url}:{model}"

    def __call__(self, **fields) -> int | None:
        prompt = self.template.format(**fields)

        def call():
            out = self.http.post(
                "/chat/completions",
                {
                    "model": self.model,
                    "temperature": self.temperature,
                    "messages": [{"role": "user", "content": prompt}],
                },
            )
            try:
                reply = out["choices"][0]["message"]["content"]
            except (TypeError, KeyError, IndexError):
                return None
            m = re.search(self.pattern, reply)
            return int(m.group(1)) if m else None

        return self.cache.get_or_call(self.name, prompt, "", call)


class Moderation:
    """The OpenAI moderation endpoint (or a compatible server): (harassment score, flagged)."""

    FLAG_CATEGORIES = (
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
    )

    def __init__(
        self,
        cache: Cache,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        timeout_s: float = 60,
        retries: int = 3,
    ):
        self.cache, self.model = cache, model
        self.http = _Http(base_url, api_key_env, timeout_s, retries)
        self.name = f"moderation:{base_url}:{model}"

    def __call__(self, text: str) -> dict | None:
        def call():
            out = self.http.post("/moderations", {"model": self.model, "input": text})
            try:
                result = out["results"][0]
                cats = result["categories"]
                return {
                    "harassment": float(result["category_scores"]["harassment"]),
                    "flagged": any(bool(cats.get(c)) for c in self.FLAG_CATEGORIES),
                }
            except (TypeError, KeyError, IndexError, ValueError):
                return None

        return self.cache.get_or_call(self.name, "", text, call)


class HFClassifier:
    """A local Hugging Face text classifier: the score of `label` as the harassment score."""

    def __init__(self, cache: Cache, path: str, label: str, flag_threshold: float = 0.5):
        from transformers import pipeline

        if not Path(path).expanduser().exists():
            raise ConfigError(
                f"toxicity classifier path '{path}' does not exist; fix: point it at a local model folder"
            )
        self.cache, self.label, self.flag_threshold = cache, label, flag_threshold
        self.pipe = pipeline("text-classification", model=str(Path(path).expanduser()), top_k=None)
        self.name = f"hf:{Path(path).expanduser().resolve()}:{label}"
        self.lock = threading.Lock()  # scorers run side by side; the pipeline is called by one at a time

    def __call__(self, text: str) -> dict | None:
        def call():
            with self.lock:
                result = self.pipe(text[:2000])[0]
            scores = {d["label"]: d["score"] for d in result}
            if self.label not in scores:
                raise ConfigError(
                    f"the classifier has no label '{self.label}'; fix: use one of {', '.join(scores)}"
                )
            return {
                "harassment": float(scores[self.label]),
                "flagged": scores[self.label] >= self.flag_threshold,
            }

        return self.cache.get_or_call(self.name, "", text, call)
