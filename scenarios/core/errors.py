"""Every exception the harness raises on purpose, in one place.

A few bases carry what the rest of the harness needs to know, so nothing is classified by the
words of a message or by a table of names: `exit_code` says how a command that ends on the
error exits (scenarios/core/contract.py), and `rank_kind` why a rank's run stopped when it
ends one (scenarios/core/records.py). An exception of any other type that ends a command is an
internal error of the harness (125), never a verdict on the system under test.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from scenarios.core.contract import ExitCode, Interrupted


class ErrorKind(str, Enum):
    """Why a rank stopped. The checker reports FAILED ranks (causes) before every invariant
    and WAITED / STOPPED ones (consequences) after them; INFRASTRUCTURE makes the verdict
    `unknown` (scenarios/judge/judging.py)."""

    FAILED = "failed"  # this rank failed on its own: a cause
    INFRASTRUCTURE = "infrastructure"  # outside the system under test (storage never came up)
    WAITED = "waited"  # a peer never came: agreement, collective or gate timeout; a consequence
    STOPPED = "stopped"  # the harness stopped the run (Ctrl-C, SIGTERM)


class CpcheckError(Exception):
    """Base of the harness's own errors."""

    #: how a command that ends on this error exits
    exit_code: ExitCode = ExitCode.UNKNOWN
    #: why a rank's run stopped, when this error ends one (None: it failed on its own)
    rank_kind: ErrorKind | None = None


# -- the three things a command can end on ---------------------------------------------------
class UsageError(CpcheckError, ValueError):
    """Bad input, found before any work starts: one line, exit 2."""

    exit_code = ExitCode.USAGE


class CannotJudge(CpcheckError, RuntimeError):
    """Infrastructure, not the system under test: verdict `unknown`, exit 125.

    `diagnosis` says what broke (master unreachable, rank killed by the OS, too many ranks,
    unknown variant / profile / SUT at this commit, newer file schema).
    """

    exit_code = ExitCode.UNKNOWN
    rank_kind = ErrorKind.INFRASTRUCTURE

    def __init__(self, diagnosis: str) -> None:
        super().__init__(diagnosis)
        self.diagnosis = diagnosis


class PeerWait(CpcheckError, RuntimeError):
    """A rank waited for a peer that never came: a consequence of another rank's failure."""

    rank_kind = ErrorKind.WAITED


class RunStopped(CpcheckError, RuntimeError):
    """The harness stopped the run (Ctrl-C, SIGTERM): every wait raises at once."""

    rank_kind = ErrorKind.STOPPED


# -- bad input -------------------------------------------------------------------------------
class LayoutError(UsageError):
    """A layout string or size that cannot describe a run; the message is one clear line."""


class ScheduleError(UsageError):
    """A schedule or scenario that cannot describe a run; one clear line.

    `loc` is the field's path, `kind` pydantic's error type and `cause` the validator's own
    exception, so callers classify by type and field, never by the message.
    """

    def __init__(self, message: str, loc: tuple = (), kind: str = "",
                 cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.loc = loc
        self.kind = kind
        self.cause = cause


class NemesisError(UsageError):
    """A bad --faults list; one line."""


class PlacementError(UsageError):
    """A --placement these hosts cannot give the layout (a group larger than a host); one line."""


class MarkerError(UsageError):
    """A docs file has a broken pair of markers for a generated table."""


#: raised inside pydantic validators, which take ValueError only; ScheduleError wraps them
class FieldProblem(ValueError):
    """A whole-Schedule check that names the field it is about (`loc`)."""

    def __init__(self, loc: tuple, message: str) -> None:
        super().__init__(message)
        self.loc = loc


class NotAtThisCommit(ValueError):
    """A name or schema version this commit does not know (it may exist at another)."""


# -- infrastructure: the run cannot be judged ------------------------------------------------
class CannotRun(CannotJudge):
    """This machine cannot run what was asked (Mooncake missing, too few ranks): exit 125."""


class EnvBuildError(CannotJudge):
    """An SGLang release environment that cannot be built here; the message names the package."""


class MissingSeam(CannotJudge):
    """The cache a release's server builds lacks a method or attribute the SGLang driver needs
    to pace and observe it: 125, naming the class and the seams (scenarios/sut/sglang/
    server_cache.py)."""


class MooncakeMasterError(CannotJudge):
    """The master could not be started, or an existing one cannot be reached (one line)."""


class ReadBackFailed(CannotJudge):
    """The master's copy of this rank's pages could not be fetched: the run's page check
    would be partial, so the run is judged `unknown` (infrastructure), not agree."""


class RankPoolError(CannotJudge):
    """Base of every failure of the torchrun rank pool."""


class RankPoolConfigError(RankPoolError, ValueError):
    """Bad pool arguments (too many ranks for this machine, port in use, no GPU)."""


class RankPoolStartError(RankPoolError):
    """torchrun or a worker failed before every rank connected; the message ends with the log."""


class MultiHostError(RankPoolError):
    """A pool over hosts could not meet: no first host at the rendezvous, a config an agent
    cannot run (scenarios/runner/multihost.py)."""


class PoolNotRunningError(RankPoolError):
    """``run`` on a pool that was never started, was closed, or was torn down by a failure."""


class RankJobError(RankPoolError):
    """The job raised on one or more ranks; the pool stays usable if every rank replied."""

    def __init__(self, message: str, job: str, failures: dict[int, tuple[str, str]]) -> None:
        super().__init__(message)
        self.job = job
        #: rank -> (one-line exception, full formatted traceback)
        self.failures = failures

    @property
    def ranks(self) -> list[int]:
        return sorted(self.failures)


class SglangSetupFailed(RankPoolError):
    """The pool's workers could not set an SGLang release up (an API the adapters do not know
    yet): a pool error for the callers that skip broken pools, a 125 naming each rank's reason."""

    def __init__(self, version: str, e: Exception) -> None:
        reasons = sorted({str(m) for m, _tb in getattr(e, "failures", {}).values()})
        super().__init__(f"sglang {version}: the harness could not set up its workers: "
                         f"{'; '.join(reasons) or e}")


class RankTimeoutError(RankPoolError):
    """Some ranks did not finish in time; ``diagnoses`` holds what each rank said it was doing."""

    def __init__(self, message: str, job: str, ranks: list[int],
                 diagnoses: dict[int, Any]) -> None:
        super().__init__(message)
        self.job = job
        self.ranks = ranks
        self.diagnoses = diagnoses


class RankDiedError(RankPoolError):
    """A worker process (or torchrun itself, ``rank=None``) exited; the pool was torn down.
    ``node``: the host that left, when every rank of another host went at once."""

    def __init__(self, message: str, rank: int | None, exitcode: int | None,
                 node: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode
        self.node = node


class RankKilled(CpcheckError, RuntimeError):
    """Raised inside a rank's IO thread by `kill_rank`: the run must end with a diagnosis."""


# -- a rank waited on a peer (consequences) --------------------------------------------------
class GateTimeout(PeerWait):
    """A gated IO unit or scheduler point waited past its timeout for the Schedule to open it."""


class CollectiveMismatchDied(CpcheckError, RuntimeError):
    """A rank died in a collective whose peers issued a different one (gloo aborts a process
    on a size mismatch), and the ranks' call logs, written as each call started, show where
    their sequences parted: a divergence of the system under test, not a broken machine."""

    exit_code = ExitCode.DIVERGE

    def __init__(self, where: str, died: str) -> None:
        super().__init__(f"collective mismatch at {where} ({died})")
        self.where = where
        self.died = died


class CollectiveTimeout(PeerWait):
    """An in-process collective whose peers never came (gloo's timeout, for threads)."""


class CollectiveError(PeerWait):
    """A torch.distributed collective failed (gloo timeout, peer gone). torch raises these as a
    bare RuntimeError; the recorder, which knows the call, re-raises them as this type."""


class PeerFailed(PeerWait):
    """Another rank's run failed; this one stopped at the same harness sync."""


class RunAborted(RunStopped):
    """The harness stopped an in-process run: every collective raises at once."""


class InfrastructureLost(Interrupted):
    """What a soak's run depends on is gone (its Mooncake master): the soak's watchdog raises
    it in the main thread to cut the run in flight; the soak ends `unknown` (125). An
    Interrupted, so every `with` block that cleans up after Ctrl-C cleans up after it."""


class Stopped(Exception):
    """SIGTERM / SIGINT during a mutation run: stop the mutants, keep what was judged (a plain
    Exception, not a CpcheckError: it never ends a command with its own exit code)."""
