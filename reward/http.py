"""HTTP reward source: a remote service scores a whole batch in one POST.

Protocol: POST `{"prompts": [str], "responses": [str], "labels": [any]}` as JSON; the service answers
200 with `{"rewards": [float]}`, one per response, in order. Connection errors, timeouts, 429 and 5xx
are retried with exponential backoff; anything else fails at once with the URL in the message.
"""

from __future__ import annotations

import json
import time
from typing import Any

import requests
from rlhf.reward.rules import RewardError


class HttpRewardError(RewardError):
    """The service could not be reached or answered outside the protocol."""


class HttpReward:
    """Client for one reward service. `args`: retries (3), backoff (0.5 s, doubled each retry),
    headers (e.g. an Authorization header), batch_size (max samples per request; default: all)."""

    def __init__(self, url: str, timeout: float = 30.0, args: dict[str, Any] | None = None):
        args = dict(args or {})
        unknown = set(args) - {"retries", "backoff", "headers", "batch_size", "timeout"}
        if unknown:
            raise ValueError(
                f"http reward {url}: unknown args {sorted(unknown)} (known: retries, backoff, headers, batch_size, timeout)"
            )
        self.url = url
        self.timeout = float(args.get("timeout", timeout))
        self.retries = int(args.get("retries", 3))
        self.backoff = float(args.get("backoff", 0.5))
        self.headers = dict(args.get("headers", {}))
        self.batch_size = args.get("batch_size")
        self.session = requests.Session()

    def score(self, prompts: list[str], responses: list[str], labels: list[Any]) -> list[Any]:
        """Raw reward values, one per response (the caller checks they are finite numbers)."""
        step = int(self.batch_size or len(prompts) or 1)
        rewards: list[Any] = []
        for start in range(0, len(prompts), step):
            end = start + step
            rewards.extend(self._post(prompts[start:end], responses[start:end], labels[start:end]))
        return rewards

    def _post(self, prompts: list[str], responses: list[str], labels: list[Any]) -> list[Any]:
        try:
            body = json.dumps({"prompts": prompts, "responses": responses, "labels": labels})
        except TypeError as exc:
            raise HttpRewardError(
                f"{self.url}: labels must be JSON-serialisable to send them: {exc}"
            ) from exc
        headers = {"Content-Type": "application/json", **self.headers}
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self.session.post(self.url, data=body, headers=headers, timeout=self.timeout)
            except requests.RequestException as exc:  # connection refused, timeout, ...
                failure = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                failure = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                continue
            return self._parse(resp, len(prompts))
        raise HttpRewardError(f"{self.url}: failed after {self.retries + 1} attempts; last error {failure}")

    def _parse(self, resp: requests.Response, expected: int) -> list[Any]:
        if resp.status_code != 200:
            raise HttpRewardError(f"{self.url}: HTTP {resp.status_code}: {resp.text[:200]!r}")
        try:
            payload = resp.json()
        except ValueError as exc:
            raise HttpRewardError(f"{self.url}: response is not JSON: {resp.text[:200]!r}") from exc
        rewards = payload.get("rewards") if isinstance(payload, dict) else None
        if not isinstance(rewards, list):
            raise HttpRewardError(
                f"{self.url}: expected a JSON object with a 'rewards' list, got {resp.text[:200]!r}"
            )
        if len(rewards) != expected:
            raise HttpRewardError(f"{self.url}: sent {expected} responses but got {len(rewards)} rewards")
        return rewards

    def close(self) -> None:
        self.session.close()
