"""Train the user's own agent: run `rollout.agent.function` per episode against an OpenAI-compatible
endpoint on the engine, record every chat call as token ids and logprobs, and assemble the calls
into training samples (docs/agents.md).

Per engine and generate call: one `ChatEndpoint` (rollout/openai_server.py) listens on a free port;
each episode's function runs in its own daemon thread with a `base_url` that names the episode; the
actor's own thread batches the pending calls into `llm.generate` (vLLM is not thread-safe, and
concurrent calls share a batch). An episode ends when its function returns, raises, or runs past
`timeout_s` (abandoned: a Python thread cannot be killed, and its later calls are refused).

Assembly (`CallAssembler`): a call whose messages are an earlier call's messages plus that call's
reply plus new messages *extends* that call's chain. Its prompt is then built from token ids, not
re-rendered text: the chain's tokens (the policy's reply exactly as sampled), the end of the
assistant turn the policy did not write, and the chat template's delta for the new messages
(rollout/chat_tokens.py), so the model is conditioned on what it really generated and the chain is
one multi-turn sample whose non-policy tokens are masked (`Sample.response_mask` 0). Any other call
(a different conversation, a rewritten history, parallel calls from one state) starts a new chain.
A request with `n` choices is n calls: choice 0 extends the chain, the others start chains whose
prompt is the same token state, so whichever choice the agent continues carries on its own chain.
Every chain becomes one Sample; all chains of an episode share its reward and its prompt's group.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from rlhf.rollout.chat_tokens import ChatTemplateError, ChatTokens
from rlhf.rollout.episodes import Completion
from rlhf.rollout.openai_protocol import ChatRequest, ChatResult, RequestError, normalize_message
from rlhf.rollout.openai_server import ChatEndpoint
from rlhf.rollout.openai_stream import content_pieces
from rlhf.rollout.openai_tool_calls import ToolCallReader

from rlhf.config.schema import AgentConfig
from rlhf.types import Prompt, Sample
from rlhf.user_code import AgentError, load_agent_function

log = logging.getLogger(__name__)

# (input ids, max new tokens, extra stop strings) of each pending call -> one completion each, in order
AgentGenerateFn = Callable[[list[tuple[list[int], int, list[str]]]], list[Completion]]
GATHER_S = 0.01  # after a call arrives, how long to wait for concurrent ones to share its batch


def parse_agent_result(value: Any) -> tuple[float, dict[str, Any]]:
    """A number, or (number, info dict); anything else is the episode's error."""
    info: Any = {}
    reward = value
    if isinstance(value, tuple) and len(value) == 2:
        reward, info = value
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not isinstance(info, dict):
        raise AgentError(f"the agent returned {value!r:.200}; expected a number or (number, info dict)")
    if not math.isfinite(reward):
        raise AgentError(f"the agent returned a non-finite reward {reward!r}")
    return float(reward), info


# ------------------------------------------------------------------------------------------------
# Assembly: calls -> token chains


@dataclass
class Chain:
    """Calls that continue one conversation: one training sample."""

    prompt_text: str
    prompt_ids: list[int]
    tools: list | None
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation incl. the last reply
    ids: list[int] = field(default_factory=list)  # everything after prompt_ids
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    last: list[int] = field(default_factory=list)  # the last reply's ids
    calls: int = 0
    finish_reason: str = "stop"
    busy: bool = False  # a call is being generated: parallel calls from this state start new chains


@dataclass
class PendingCall:
    """A call whose prompt is decided but whose reply is not generated yet."""

    chain: Chain
    messages: list[dict[str, Any]]
    appended_ids: list[int]  # tokens between the chain's last reply and this reply (mask 0)
    appended_text: str
    input_ids: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)  # the request's own stop strings


class CallAssembler:
    """Joins one episode's calls into chains; `begin` decides a call's prompt, `finish` records it."""

    def __init__(self, chat: ChatTokens, context_len: int, max_new_tokens: int):
        self.chat = chat
        self.context_len = context_len
        self.max_new_tokens = max_new_tokens
        self.chains: list[Chain] = []

    def begin(self, request: ChatRequest) -> list[PendingCall]:
        """The call's prompt: its chain's tokens + the delta when it extends one, else a fresh render;
        one PendingCall per choice (`n`). Choice 0 extends the chain; every other choice is a chain
        of its own whose prompt is that same token state, so the shared history trains once (in
        choice 0's sample) and each reply trains once. Raises RequestError (400) when it does not
        fit the context; nothing is changed then."""
        pending = self._extend(request)
        if pending is None:
            text, ids = self.chat.prompt(request.messages, request.tools)
            chain = Chain(text, ids, request.tools)
            pending = PendingCall(chain, request.messages, [], "", list(ids), 0)
        room = self.context_len - 1 - len(pending.input_ids)  # one position kept for scoring (sync audit)
        if room < 1:
            raise RequestError(
                400,
                f"context length exceeded: the conversation has {len(pending.input_ids)} tokens and "
                f"rollout.max_model_len is {self.context_len}",
                "context_length_exceeded",
                "messages",
            )
        pending.max_tokens = min(room, self.max_new_tokens, request.max_tokens or self.max_new_tokens)
        pending.stop = list(request.stop)
        branches = [pending]
        state_text = pending.chain.prompt_text + "".join(pending.chain.texts) + pending.appended_text
        for _ in range(1, request.n):
            fork = Chain(state_text, list(pending.input_ids), request.tools)
            branches.append(
                PendingCall(fork, request.messages, [], "", list(pending.input_ids), pending.max_tokens)
            )
            branches[-1].stop = list(request.stop)
        for branch in branches:
            if branch.chain not in self.chains:
                self.chains.append(branch.chain)
            branch.chain.busy = True
        return branches

    def _extend(self, request: ChatRequest) -> PendingCall | None:
        for chain in reversed(self.chains):
            k = len(chain.messages)
            if chain.busy or not chain.calls or chain.tools != request.tools or len(request.messages) <= k:
                continue
            if [_comparable(m) for m in request.messages[:k]] != [_comparable(m) for m in chain.messages]:
                continue
            new = request.messages[k:]
            try:
                text, delta = self.chat.delta(new, request.tools)
            except ChatTemplateError:  # the template rewrites earlier turns: render this call afresh
                return None
            close = self.chat.close_turn(chain.last)
            closing = self.chat.tokenizer.decode(close, skip_special_tokens=False)
            appended = close + delta
            input_ids = chain.prompt_ids + chain.ids + appended
            return PendingCall(chain, request.messages, appended, closing + text, input_ids, 0)
        return None

    def finish(self, pending: PendingCall, completion: Completion, message: dict | None = None) -> None:
        """Record the reply; `message` is the assistant message as returned (with parsed tool calls),
        which a continuation repeats, so the chain keeps it as the conversation's last turn."""
        chain = pending.chain
        ids = list(completion.token_ids)
        logprobs = list(completion.logprobs or [0.0] * len(ids))[: len(ids)]
        chain.ids += pending.appended_ids + ids
        chain.mask += [0] * len(pending.appended_ids) + [1] * len(ids)
        chain.logprobs += [0.0] * len(pending.appended_ids) + logprobs
        chain.texts += [pending.appended_text, completion.text]
        reply = message or {"role": "assistant", "content": completion.text}
        chain.messages = [*pending.messages, normalize_message(reply)]
        chain.last = ids
        chain.calls += 1
        chain.finish_reason = completion.finish_reason
        chain.busy = False

    def abandon(self, pending: PendingCall) -> None:
        pending.chain.busy = False


# ------------------------------------------------------------------------------------------------
# Episodes


@dataclass
class AgentEpisode:
    prompt: Prompt
    group: int
    key: str
    calls: CallAssembler
    started: float = 0.0
    finished: bool = False  # the function returned or raised, or the episode timed out
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    num_calls: int = 0


class AgentRunner:
    """Runs `n` agent episodes per prompt through one engine's generate function."""

    def __init__(
        self,
        cfg: AgentConfig,
        tokenizer: Any,
        context_len: int,
        model_name: str,
        function: Callable[..., Any] | None = None,
    ):
        self.cfg = cfg
        self.chat = ChatTokens(tokenizer)
        self.tool_calls = ToolCallReader(tokenizer)
        self.context_len = context_len
        self.model_name = model_name
        self.function = function or load_agent_function(cfg.function)
        self._lock = threading.Lock()
        self._episodes: dict[str, AgentEpisode] = {}
        self._queue: queue.Queue = queue.Queue()
        self._open = False

    # -------------------------------------------------------------------------------- the step
    def run(
        self,
        prompts: list[Prompt],
        groups: list[int],
        n: int,
        generate: AgentGenerateFn,
        max_new_tokens: int,
        logprobs: bool = False,
        version: int = 0,
    ) -> list[Sample]:
        """n episodes per prompt, prompt-major; each episode gives one Sample per chain (at least one)."""
        episodes = [
            AgentEpisode(
                p, g, secrets.token_urlsafe(8), CallAssembler(self.chat, self.context_len, max_new_tokens)
            )
            for p, g in zip(prompts, groups)
            for _ in range(n)
        ]
        with self._lock:
            self._episodes = {e.key: e for e in episodes}
            self._queue = queue.Queue()
            self._open = True
        endpoint = ChatEndpoint(self.cfg.host, self.model_name, self._handle_chat, self._is_open)
        public_host = _reachable_host(self.cfg.host)
        try:
            with endpoint:
                for e in episodes:
                    url = endpoint.base_url(e.key, public_host)
                    e.started = time.monotonic()
                    threading.Thread(
                        target=self._run_episode, args=(e, url, self._queue), daemon=True, name="agent"
                    ).start()
                self._serve(episodes, generate)
        finally:
            self._close()
        return [s for e in episodes for s in self._samples(e, version, logprobs)]

    def _run_episode(self, e: AgentEpisode, base_url: str, wake: queue.Queue) -> None:
        error = None
        try:
            reward, info = parse_agent_result(self.function(e.prompt, base_url, **self.cfg.args))
        except BaseException as exc:  # the agent's bug ends its own episode, never the step
            reward, info, error = 0.0, {}, f"{type(exc).__name__}: {exc}"
        with self._lock:
            if not e.finished:  # else it timed out already: its late result is not used
                e.reward, e.info, e.error, e.finished = reward, info, error, True
        wake.put(None)  # wake its step's serving loop (an abandoned episode may return steps later)

    def _serve(self, episodes: list[AgentEpisode], generate: AgentGenerateFn) -> None:
        """The actor thread: batch pending calls into the engine until every episode has finished."""
        while True:
            self._expire(episodes)
            with self._lock:
                running = sum(not e.finished for e in episodes)
            if not running:
                return
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first, *self._drain()]
            if sum(item is not None for item in batch) < running:
                time.sleep(GATHER_S)
                batch += self._drain()
            calls = []
            with self._lock:
                for item in batch:
                    if item is None:
                        continue
                    e, branches, request, future = item
                    if e.finished:
                        for pending in branches:
                            e.calls.abandon(pending)
                        future.set_exception(RequestError(410, "the episode is over", "episode_finished"))
                    else:
                        calls.append(item)
            if not calls:
                continue
            flat = [p for _, branches, _, _ in calls for p in branches]  # every choice of every call
            try:
                completions = iter(generate([(p.input_ids, p.max_tokens, p.stop) for p in flat]))
            except Exception as exc:  # an engine failure: every waiting agent gets a 500, then it is raised
                for *_, future in calls:
                    future.set_exception(exc)
                raise
            with self._lock:
                for e, branches, request, future in calls:
                    results = []
                    for pending in branches:
                        completion = next(completions)
                        result = self._result(pending, completion, request)
                        e.calls.finish(pending, completion, result.message)
                        results.append(result)
                    future.set_result(results)

    def _drain(self) -> list:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _expire(self, episodes: list[AgentEpisode]) -> None:
        now = time.monotonic()
        with self._lock:
            for e in episodes:
                if not e.finished and now - e.started > self.cfg.timeout_s:
                    e.finished = True
                    e.error = f"no result within rollout.agent.timeout_s={self.cfg.timeout_s:g}s (abandoned)"

    def _close(self) -> None:
        """The step is over: refuse new calls and answer the waiting ones."""
        with self._lock:
            self._open = False
            for item in self._drain():
                if item is not None:
                    for pending in item[1]:
                        item[0].calls.abandon(pending)
                    item[3].set_exception(RequestError(503, "the rollout step is over", "step_over"))

    # -------------------------------------------------------------------------------- server side
    def _is_open(self, key: str) -> bool:
        with self._lock:
            e = self._episodes.get(key)
            return self._open and e is not None and not e.finished

    def _handle_chat(self, key: str, request: ChatRequest) -> list[ChatResult]:
        """Runs on a server thread: decide the call's prompt, queue it, wait for its n choices."""
        future: Future = Future()
        with self._lock:
            e = self._episodes.get(key)
            if not self._open or e is None or e.finished:
                raise RequestError(410, "the episode is over", "episode_finished")
            if e.num_calls + request.n > self.cfg.max_calls:  # each choice counts as a call
                raise RequestError(
                    429,
                    f"the episode made {e.num_calls} of rollout.agent.max_calls={self.cfg.max_calls} "
                    f"calls (each of n choices counts), {request.n} more asked",
                    "max_calls",
                )
            try:
                branches = e.calls.begin(request)
            except RequestError:
                raise
            except Exception as exc:  # the agent's messages, not the engine: a 400 it can read
                raise RequestError(
                    400, f"the chat template cannot render these messages: {exc}", param="messages"
                ) from exc
            e.num_calls += request.n
            self._queue.put((e, branches, request, future))
        return future.result()

    def _result(self, pending: PendingCall, completion: Completion, request: ChatRequest) -> ChatResult:
        ids = list(completion.token_ids)
        decode = self.chat.tokenizer.decode
        finish = "length" if completion.finish_reason == "length" else "stop"
        message = self.tool_calls.message(completion.text, ids) if request.parse_tool_calls else None
        if message is not None:
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": completion.text}
        pieces = []
        if request.stream and not message.get("tool_calls"):
            pieces = content_pieces(lambda t: decode(t, skip_special_tokens=True), ids, completion.text)
        return ChatResult(
            text=completion.text,
            prompt_ids=list(pending.input_ids),
            completion_ids=ids,
            logprobs=list(completion.logprobs or [0.0] * len(ids)),
            finish_reason=finish,
            token_texts=[decode([t]) for t in ids],
            message=message,
            pieces=pieces,
        )

    # -------------------------------------------------------------------------------- samples
    def _samples(self, e: AgentEpisode, version: int, logprobs: bool) -> list[Sample]:
        chains = [c for c in e.calls.chains if c.calls]
        record = {
            "reward": e.reward if e.error is None else 0.0,
            "turn_rewards": [],
            "final_reward": e.reward if e.error is None else 0.0,
            "error": e.error,
            "info": e.info,
            "calls": sum(c.calls for c in chains),
            "chains": len(chains),
        }
        if not chains:  # no call was answered: an empty response carries the reward (or the error)
            return [
                Sample(
                    group=e.group,
                    prompt=e.prompt,
                    response_ids=[],
                    response_text="",
                    logprobs=[] if logprobs else None,
                    finish_reason="agent_error" if e.error else "stop",
                    policy_version=version,
                    response_mask=[],
                    episode={**record, "turns": 0, "chain": 0},
                )
            ]
        return [
            Sample(
                group=e.group,
                prompt=dataclasses.replace(e.prompt, text=c.prompt_text, token_ids=list(c.prompt_ids)),
                response_ids=c.ids,
                response_text="".join(c.texts),
                logprobs=c.logprobs if logprobs else None,
                finish_reason="agent_error" if e.error else c.finish_reason,
                policy_version=version,
                response_mask=c.mask,
                episode={**record, "turns": c.calls, "chain": i},
            )
            for i, c in enumerate(chains)
        ]


def _comparable(message: dict[str, Any]) -> dict[str, Any]:
    """A message as continuations are matched: tool calls by name and parsed arguments, so an agent
    that rebuilds the assistant message from stream chunks or re-serializes the arguments (or drops
    the call ids) is still recognised; the turn's tokens are the policy's either way."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    from rlhf.rollout.chat_tokens import parsed_arguments

    key = [(call["function"]["name"], parsed_arguments(call["function"]["arguments"])) for call in calls]
    return {**message, "tool_calls": key}


def _reachable_host(host: str) -> str:
    """The address agents use: the bound one, or this node's IP when bound to every interface."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        import socket

        return socket.gethostbyname(socket.gethostname())
