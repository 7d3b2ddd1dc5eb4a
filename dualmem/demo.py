"""``dualmem demo``: one complete CFN loop (agents, Loop 3/2/4, a signal with ACKs, a dead
agent) with a live Subscriber feed and per-path latency; a second run finds the state."""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from acl.crypto import Keyring, envelope_key_id
from acl.levels import Level
from acl.principal import Principal
from dualmem.coordination import AgentLifecycle, BlockingCoordinator, LoopMemory
from dualmem.errors import AccessDenied
from dualmem.memory import DualMemory
from dualmem.metrics import Histogram
from dualmem.settings import Settings
from dualmem.store import Change
from dualmem.subscriber import POSITION_PREFIX, Subscriber

__all__ = ["run_demo"]

SWARM, PROJECT, PHASE = "phase-1-auth", "shop", "auth"
FEED_NAME = "demo-observer"
DEMO_NAMESPACE = "dualmem-demo"
HEARTBEAT_TIMEOUT = 1.5  # seconds; short so the demo shows a dead agent within a run
ACK_TIMEOUT = 2.0  # longer than HEARTBEAT_TIMEOUT: the hung agent is stale by the end
LOAD_ITERATIONS = 500  # per agent, in the load section

CODERS = tuple(
    Principal(agent_id=f"coder-{i}", team="backend", swarm=SWARM, project=PROJECT)
    for i in (1, 2, 3)
)
VALIDATOR = Principal(agent_id="validator-1", swarm=SWARM, project=PROJECT)
OWNER = Principal(agent_id="product-owner", swarm=SWARM, project=PROJECT, system=True)
COORDINATOR = Principal(agent_id="coordinator", swarm=SWARM, project=PROJECT)
ROGUE = Principal(agent_id="rogue-agent", swarm=SWARM, project=PROJECT)

# (confidence, reasoning) per coder for the two Loop 3 iterations of a run: the first
# misses the gate, the second passes it.
_ITERATIONS = (
    (
        (0.62, "token refresh path untested"),
        (0.81, "handlers done, tests green"),
        (0.70, "rate limiter still open"),
    ),
    (
        (0.84, "refresh path covered"),
        (0.88, "reviewed, no blockers"),
        (0.79, "rate limiter done, one flaky test"),
    ),
)


@dataclass(frozen=True)
class _Glyphs:
    ok: str
    no: str
    arrow: str
    bar: str

    @classmethod
    def for_console(cls, console: Console) -> _Glyphs:
        if console.encoding.lower().startswith("utf"):
            return cls("✓", "✗", "→", "┆")
        return cls("ok", "x", "->", "|")


def _describe(change: Change, event: str | None, resent: bool) -> str:
    """A change's key in words. Notifications and the journal carry no values; ``event``
    is read from the (never overwritten) lifecycle event record."""
    parts = change.key.split("/")
    if change.key.startswith("lifecycle/agents/"):
        return f"{parts[2]} state"
    if change.key.startswith("lifecycle/events/"):
        return f"{parts[2]} event: {event or '?'}"
    if change.key.startswith("cfn/") and len(parts) == 6:
        names = {"loop2": "Loop 2 consensus", "loop3": "Loop 3 confidence", "loop4": "decision"}
        return f"{names.get(parts[3], parts[3])} {parts[4]} #{int(parts[5])}"
    if change.key.startswith("coord/signals/"):
        return f"signal ..{parts[2][-6:]} {'re-sent' if resent else 'sent'}"
    if change.key.startswith("coord/acks/"):
        return f"ACK ..{parts[2][-6:]} for {parts[3]}"
    return change.key


class _Feed:
    """The observer: a Subscriber in a thread, printing each change as it is delivered."""

    def __init__(self, mem: DualMemory, console: Console, glyphs: _Glyphs) -> None:
        self.mem = mem
        self.console = console
        self.glyphs = glyphs
        self.saved = Subscriber.saved_position(mem, OWNER, FEED_NAME)
        self.start_seq = mem.store.last_seq()
        self.sub = Subscriber(mem, OWNER, since=FEED_NAME)
        self.printed = self.sub.position
        self.caught_up = 0
        self.hidden = 0
        self.live = 0
        self.latency = Histogram()
        self.signals: set[str] = set()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for change in self.sub:
                self._show(change)
                self.printed = change.seq
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _show(self, change: Change) -> None:
        g = self.glyphs
        if change.seq <= self.start_seq:
            self.caught_up += 1
            if self.caught_up > 8:
                self.hidden += 1
                return
            tag = "[magenta]caught up[/]"
        else:
            self.live += 1
            lag_ms = max(0, time.time_ns() // 1_000_000 - change.ts)
            self.latency.record(lag_ms * 1_000_000)
            tag = "[cyan]live[/]     "
        event = None
        if change.key.startswith("lifecycle/events/") and change.op == "put":
            value = self.mem.get(change.key, level=change.level, principal=OWNER)
            event = value.get("event") if isinstance(value, dict) else None
        resent = change.key in self.signals
        self.signals.add(change.key)
        scope = change.scope.split(":", 1)[0]
        self.console.print(
            f"   [dim]{g.bar}[/] {tag} [dim]#{change.seq:<5}[/] {change.op:<3} "
            f"{_describe(change, event, resent):<28} [dim]{scope:<6} by {change.actor}[/]"
        )

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every change the observer may see so far has been printed."""
        rows = self.mem.changes(self.printed, principal=OWNER)
        visible = [c.seq for c in rows if not c.key.startswith(POSITION_PREFIX)]
        target = max(visible, default=self.printed)
        deadline = time.monotonic() + timeout
        while self.printed < target and self.error is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.error is not None:
            raise self.error
        if self.hidden:
            self.console.print(f"   [dim]{self.glyphs.bar} ... and {self.hidden} more caught up[/]")
            self.hidden = 0

    def stop(self) -> None:
        self.sub.close()
        self._thread.join(10)


class _Agent:
    """A working agent in its own thread: heartbeats, and ACKs every signal addressed to it."""

    def __init__(
        self, principal: Principal, life: AgentLifecycle, coordinator: BlockingCoordinator
    ) -> None:
        self.principal = principal
        self.life = life
        self.coordinator = coordinator
        self.acked: list[str] = []
        self.repeat_was_no_op = True
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        next_beat = 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self.life.heartbeat(self.principal.agent_id)
                    next_beat = now + HEARTBEAT_TIMEOUT / 3
                for signal in self.coordinator.pending_signals():
                    ack = self.coordinator.acknowledge_signal(signal)
                    # Agents may see a signal twice (a retry): the second ACK is a no-op.
                    again = self.coordinator.acknowledge_signal(signal)
                    self.repeat_was_no_op &= again == ack
                    self.acked.append(signal.id)
                self.stop.wait(0.05)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def join(self) -> None:
        self.stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error


def _settings(
    redis_url: str | None, db_path: str | None, keyring: str | None
) -> tuple[dict[str, Any], str | None]:
    """DualMemory arguments for the demo, and a note for the reader (or ``None``)."""
    base = Settings.load({"redis_url": redis_url, "db_path": db_path, "keyring": keyring})
    args: dict[str, Any] = {"redis_url": base.redis_url, "db_path": base.db_path}
    note = None
    if base.keyring:
        args["keyring"] = base.keyring
    if not base.embedded:
        # Keep the demo's streams apart from a real deployment on the same Redis.
        if base.namespace == Settings.namespace:
            args["namespace"] = DEMO_NAMESPACE
        if not base.keyring and not base.key:
            path = base.default_keyring_path
            if not base.default_key_file_exists():
                Keyring.generate().save(path)
            args["keyring"] = str(path)
            note = f"key file {path} (created on first use, mode 0600; keep it)"
    return args, note


def _signal_secret(db_path: str) -> bytes:
    """The participants' shared signal secret, kept beside the database (mode 0600).

    Participants share one long-lived secret, provisioned out of band; here that is a file,
    so a later run can still verify the signals and ACKs of an earlier one.
    """
    path = Path(db_path + ".signal-secret")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


def run_demo(
    redis_url: str | None = None, db_path: str | None = None, keyring: str | None = None
) -> int:
    """Run one CFN loop on dualmem and print it as it happens; returns the exit code.

    Embedded by default (``memory://`` and ``./dualmem.db``, no set-up); ``redis_url``
    points it at a real Redis (namespace ``dualmem-demo`` unless ``DUALMEM_NAMESPACE``
    says otherwise). Run it twice: the second run reads the first one's decision, agent
    states and subscriber position back from the database.
    """
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=100)  # piped: room for the table
    g = _Glyphs.for_console(console)
    args, key_note = _settings(redis_url, db_path, keyring)
    with DualMemory(**args) as mem:
        _Demo(mem, console, g, key_note).run()
    return 0


class _Demo:
    def __init__(
        self, mem: DualMemory, console: Console, glyphs: _Glyphs, key_note: str | None
    ) -> None:
        self.mem = mem
        self.out = console
        self.g = glyphs
        self.key_note = key_note
        self.loops = LoopMemory(mem, swarm=SWARM, project=PROJECT)
        self.life = AgentLifecycle(mem, COORDINATOR, heartbeat_timeout=HEARTBEAT_TIMEOUT)
        self.secret = _signal_secret(mem.settings.db_path)
        self.step_no = 0
        self.agents: list[_Agent] = []

    def step(self, title: str) -> None:
        self.step_no += 1
        self.out.print()
        self.out.rule(f"[bold]{self.step_no}. {title}", align="left", style="dim")

    def say(self, text: str) -> None:
        self.out.print(f"   {text}")

    def sync_all(self) -> None:
        self.loops.sync(10)
        self.life.sync(10)

    # -- the run -------------------------------------------------------------------------

    def run(self) -> None:
        s = self.mem.settings
        where = "embedded fakeredis + worker thread" if s.embedded else "real Redis"
        self.out.print(
            f"[bold]dualmem demo[/]: a CFN loop on {s.shown_url} ({where}), database {s.db_path}"
        )
        if self.key_note:
            self.say(f"[dim]{self.key_note}[/]")
        run_no = self.earlier_state()
        audit_from = self.last_audit_id()
        journal_from = self.mem.store.last_seq()
        feed = _Feed(self.mem, self.out, self.g)
        self.out.print()
        start = "from the beginning" if feed.saved is None else f"after seq {feed.saved}"
        self.say(
            f"The observer ([bold]{OWNER.agent_id}[/]) follows every change it may read "
            f"with a Subscriber named '{FEED_NAME}', {start}:"
        )
        feed.start()
        feed.flush()
        if feed.caught_up == 0:
            self.say("[dim](nothing to catch up on)[/]")
        first, second = 2 * run_no - 1, 2 * run_no

        self.spawn(feed)
        self.loop3(feed, first, _ITERATIONS[0])
        self.loop3(feed, second, _ITERATIONS[1])
        self.loop2(feed, second)
        self.loop4(feed, second)
        self.signal(feed)
        self.dead_agent(feed)
        self.load()
        feed.flush()
        feed.stop()
        self.summary(feed, run_no, audit_from, journal_from)

    def earlier_state(self) -> int:
        decisions = self.loops.list_loop4_decisions(OWNER, PHASE)
        agents = self.life.list_agents()
        saved = Subscriber.saved_position(self.mem, OWNER, FEED_NAME)
        if not decisions and not agents:
            self.say(f"First run: {self.mem.settings.db_path} holds no earlier loop.")
            return 1
        runs = len(decisions)
        # Agents and no decision: a run interrupted before its Loop 4 (not "0 runs").
        found = (
            f"the state of {runs} earlier run{'s' if runs != 1 else ''}"
            if runs
            else "the state an interrupted earlier run left"
        )
        self.out.print(
            f"[bold green]Found {found}[/] in {self.mem.settings.db_path}: it survived the restart."
        )
        for d in decisions[-3:]:
            when = time.strftime("%H:%M:%S", time.localtime(d.decided_at / 1e6))
            self.say(
                f"- decision {d.phase} #{d.iteration}: {d.decision.value} by {d.decided_by} "
                f"at {when} (SYSTEM level, decrypted with the saved key)"
            )
        if agents:
            states = ", ".join(f"{a.agent_id} {a.status.value}" for a in agents)
            self.say(f"- agents: {states}")
        if saved is not None:
            self.say(f"- the observer's Subscriber saved its position at journal seq {saved}")
        return runs + 1

    def last_audit_id(self) -> int:
        rows = self.mem.store.audit_log()
        return rows[-1].id if rows else 0

    # -- steps ---------------------------------------------------------------------------

    def spawn(self, feed: _Feed) -> None:
        self.step("Spawn three agents in swarm " + SWARM)
        # A run interrupted (Ctrl-C, a closed pipe) after its spawn left its agents alive,
        # and spawning an alive agent is refused: end their lives first.
        left = [a for a in (self.life.agent(p.agent_id) for p in CODERS) if a is not None]
        left = [a for a in left if not a.status.final]
        for a in left:
            self.life.register_termination(a.agent_id, "left alive by an interrupted demo run")
        if left:
            names = ", ".join(f"{a.agent_id} ({a.status.value})" for a in left)
            self.say(f"an interrupted earlier run left {names} alive: terminated them first")
        for p in CODERS:
            self.life.register_spawn(
                p.agent_id, f"Coder {p.agent_id[-1]}", "coder", ["python", "sql"], Level.PRIVATE
            )
        self.say(
            f"{self.life.principal.agent_id} registers coder-1..3 (heartbeat timeout "
            f"{HEARTBEAT_TIMEOUT:.1f}s); the registry is SWARM-level, so the observer sees it:"
        )
        self.sync_all()
        feed.flush()

    def loop3(self, feed: _Feed, iteration: int, values: tuple[tuple[float, str], ...]) -> None:
        g = self.g
        self.step(f"Loop 3, iteration {iteration}: each agent stores its own confidence")
        threshold = self.loops.confidence_threshold
        for p, (confidence, reasoning) in zip(CODERS, values, strict=True):
            mark = f"[green]{g.ok}[/]" if confidence >= threshold else f"[red]{g.no}[/]"
            self.say(f"{p.agent_id}  {confidence:.2f} {mark}  [dim]{reasoning}[/]")
        self.say("[dim]entries are PRIVATE (encrypted): the feed shows registry updates only[/]")
        for p, (confidence, reasoning) in zip(CODERS, values, strict=True):
            self.loops.store_loop3_confidence(
                p, PHASE, iteration, confidence, reasoning, ttl=7 * 86_400
            )
            self.life.update_confidence(p.agent_id, confidence, reasoning, PHASE, iteration)
        self.sync_all()
        feed.flush()
        passed = self.loops.confidence_gate_passed([c for c, _ in values])
        verdict = (
            f"[green]passed {g.arrow} Loop 2[/]"
            if passed
            else f"[red]not passed {g.arrow} iterate[/]"
        )
        self.say(f"gate (every confidence >= {threshold:.2f}): {verdict}")
        if iteration % 2 == 1:
            self.privacy(iteration)

    def privacy(self, iteration: int) -> None:
        g = self.g
        row = self.mem.store.get(
            "agent:coder-1", self.loops.key(3, PHASE, iteration), int(time.time() * 1000)
        )
        if row is not None:
            self.say(
                f"in SQLite coder-1's entry is {len(row.envelope)} bytes of AES-256-GCM "
                f"ciphertext (key id {envelope_key_id(row.envelope)})"
            )
        try:
            self.loops.get_loop3_confidence(CODERS[1], PHASE, iteration, agent_id="coder-1")
        except AccessDenied:
            self.say(f"coder-2 reads coder-1's entry {g.arrow} [red]AccessDenied[/] (audited)")
        mine = self.loops.get_loop3_confidence(CODERS[1], PHASE, iteration)
        if mine is not None:
            self.say(f"coder-2 reads its own {g.arrow} {mine.confidence:.2f}")

    def loop2(self, feed: _Feed, iteration: int) -> None:
        g = self.g
        self.step(f"Loop 2: {VALIDATOR.agent_id} stores the swarm's consensus (SWARM)")
        score = 0.93
        self.loops.store_loop2_consensus(
            VALIDATOR,
            PHASE,
            iteration,
            score,
            {"tests": "212 passed", "security": "no findings", "coverage": 0.91},
            ["add a rate-limit alert"],
        )
        self.sync_all()
        feed.flush()
        latest = self.loops.get_loop2_consensus(COORDINATOR, PHASE)
        assert latest is not None
        verdict = (
            f"[green]passed {g.arrow} Loop 4[/]" if latest.gate_passed else "[red]not passed[/]"
        )
        self.say(
            f"coordinator reads the latest consensus: {latest.score:.2f} (iteration "
            f"{latest.iteration}); gate (>= {self.loops.consensus_threshold:.2f}): {verdict}"
        )

    def loop4(self, feed: _Feed, iteration: int) -> None:
        g = self.g
        self.step(f"Loop 4: {OWNER.agent_id} decides (SYSTEM, encrypted)")
        self.loops.store_loop4_decision(
            OWNER,
            PHASE,
            iteration,
            "PROCEED",
            "all gates passed; rate-limit alert deferred",
            deferred_issues=["rate-limit alert"],
            next_actions=["start phase-2-ui"],
        )
        self.sync_all()
        feed.flush()
        try:
            self.loops.list_loop4_decisions(VALIDATOR)
        except AccessDenied:
            self.say(f"validator-1 lists decisions {g.arrow} [red]AccessDenied[/] (not system)")
        decisions = self.loops.list_loop4_decisions(OWNER, PHASE)
        self.say(
            f"product-owner lists decisions {g.arrow} {len(decisions)}, latest "
            f"[bold]{decisions[-1].decision.value}[/]"
        )

    def signal(self, feed: _Feed) -> None:
        g = self.g
        self.step("Blocking signal: the coordinator waits for every agent's signed ACK")
        boss = BlockingCoordinator(self.mem, COORDINATOR, self.secret, max_retries=2)
        agents = self.agents = [
            _Agent(p, self.life, BlockingCoordinator(self.mem, p, self.secret)) for p in CODERS[:2]
        ]
        self.say(
            "coder-1 and coder-2 are working (heartbeats, ACKs); [yellow]coder-3 hangs[/]; "
            "rogue-agent plants an ACK for coder-3 without the secret"
        )
        for a in agents:
            a.start()
        sig = boss.send_signal([p.agent_id for p in CODERS], "phase-complete", {"phase": PHASE})
        forged = {
            "signal_id": sig.id,
            "target": "coder-3",
            "digest": sig.digest,
            "acked_at": time.time_ns() // 1000,
            "kid": sig.kid,
            "mac": secrets.token_hex(32),
        }
        self.mem.put(f"coord/acks/{sig.id}/coder-3", forged, level=Level.SWARM, principal=ROGUE)
        result = boss.wait_for_acks(sig, timeout=ACK_TIMEOUT)
        boss.sync(10)
        self.sync_all()
        feed.flush()
        self.say(
            f"wait_for_acks({ACK_TIMEOUT}s, max_retries=2): acked "
            f"[green]{', '.join(result.acked)}[/]; missing [red]{', '.join(result.missing)}[/] "
            f"after {result.retries} re-sends"
        )
        for target, reason in result.rejected.items():
            self.say(f"ACK for {target} [red]rejected[/]: {reason} (audited high risk)")
        if all(a.repeat_was_no_op for a in agents):
            self.say(f"each agent ACKed twice {g.arrow} the second ACK was a no-op")

    def dead_agent(self, feed: _Feed) -> None:
        g = self.g
        self.step("Heartbeats: who stopped answering?")
        dead = self.life.stale_agents()
        for a in self.agents:  # they kept working (and heartbeating) until now
            a.join()
        self.sync_all()
        feed.flush()
        for info in dead:
            self.say(
                f"{info.agent_id}: {info.end_reason} {g.arrow} [red]marked dead[/] "
                "(event recorded, audited)"
            )
        alive = [a.agent_id for a in self.life.list_agents(status="active")]
        self.say(f"still active: {', '.join(alive) or 'none'}")

    def load(self) -> None:
        self.step("The write path under load")
        n = LOAD_ITERATIONS * len(CODERS)
        t0 = time.perf_counter()
        for i in range(LOAD_ITERATIONS):
            for p in CODERS:
                self.loops.store_loop3_confidence(
                    p, "soak", i, 0.5 + (i % 50) / 100, "soak test", ttl=3600
                )
        elapsed = time.perf_counter() - t0
        self.loops.sync(30)
        for i in range(0, LOAD_ITERATIONS, 5):
            self.loops.get_loop3_confidence(CODERS[i % 3], "soak", i)
        self.say(
            f"{n:,} encrypted Loop 3 writes in {elapsed * 1000:,.0f} ms "
            f"({n / elapsed:,.0f}/s, one Redis round trip each), all persisted to SQLite; "
            "none reached the observer (private)"
        )

    # -- the end -------------------------------------------------------------------------

    def summary(self, feed: _Feed, run_no: int, audit_from: int, journal_from: int) -> None:
        self.step("Latency per path and what was recorded")
        table = Table(title="latency (ms)", title_justify="left")
        for col in ("path", "measures", "count", "p50", "p95", "p99", "max"):
            table.add_column(col, justify="left" if col in ("path", "measures") else "right")
        measures = {
            "redis_write": "put/delete: MULTI SET XADD EXEC",
            "encode": "JSON, lz4, AES-256-GCM",
            "persist": "worker commit, per record",
            "lag": "write to SQLite commit",
            "read": "get / query from SQLite",
        }
        rows: list[tuple[str, str, dict[str, float]]] = [
            (path, measures.get(path, ""), m) for path, m in self.mem.metrics().items()
        ]
        rows.append(("feed", "put to observer (1 ms steps)", self.feed_summary(feed)))
        for path, what, m in rows:
            table.add_row(
                path,
                what,
                f"{int(m['count']):,}",
                *(f"{m[k]:.3f}" for k in ("p50", "p95", "p99", "max")),
            )
        self.out.print(table)
        audit = self.mem.store.audit_log(audit_from)
        high = sorted({r.event for r in audit if r.risk == "high"})
        others = sorted({r.event for r in audit if r.risk != "high"} - set(high))
        n_high = sum(1 for r in audit if r.risk == "high")
        self.say(
            f"audit log: {len(audit)} rows this run; {n_high} high risk "
            f"([dim]{', '.join(high) or 'none'}[/]), the rest [dim]{', '.join(others)}[/]"
        )
        journal = self.mem.store.last_seq() - journal_from
        self.say(
            f"journal: {journal:,} changes this run; the observer was shown {feed.live} "
            "(the rest are agents' private entries and its own saved positions)"
        )
        # Written after the observer stopped: the next run's Subscriber catches them up.
        for p in CODERS:
            info = self.life.agent(p.agent_id)
            if info is not None and not info.status.final:
                self.life.register_termination(p.agent_id, "phase complete")
        self.sync_all()
        report = self.mem.close()
        state = "drained" if report.drained else f"{report.pending} commands pending"
        self.out.print()
        self.out.print(
            f"closed ({state}). The observer saved its position at seq {feed.sub.position}; "
            f"coder-1 and coder-2 were terminated after it stopped. Run [bold]dualmem demo[/] "
            f"again: run {run_no + 1} finds this state and catches up on what it missed."
        )

    @staticmethod
    def feed_summary(feed: _Feed) -> dict[str, float]:
        return feed.latency.summary()
