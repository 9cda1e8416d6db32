"""The GitHub issue queue: labelled issues become trials, and the results go back to the issue.

An issue carrying the intake label (default `autovibe`) in a configured repository is queued
once, keyed by (repository, number) in the state DB, with its title and body as they were then:
the row is the truth, the `autovibe:*` labels only show it. Queued issues are submitted through
the control API under the operator's trial template, as a task on the repository's default
branch head whose tests come from a fenced ```autovibe (or ```yaml) block of the issue or from
the repository's `.autovibe.yaml`. When the trial ends, a comment gives the result and the best
accepted patch becomes a branch and a pull request.

Issues arrive by polling (a conditional request per repository: a 304 costs no rate limit; a
changed answer is read on through its `Link: rel="next"` pages while they bring new issues) or
by the webhook (`POST /v1/intake/github`, `X-Hub-Signature-256` checked). Calls stop while the
rate-limit headers say fewer than `rate_floor` requests are left, until the reset.

What a state change tells the issue is written with it, as a comment owed (`IntakeComment`),
then posted; one GitHub did not take is posted again each round until it is, in order, so a
failure at that moment loses no comment (it may, rarely, post one twice: GitHub took it but
the answer was lost). Labels follow the state the same way: each round shows the state of every
issue whose label lags behind.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from githubkit import GitHub, Response
from githubkit.exception import RateLimitExceeded, RequestError, RequestFailed
from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from contracts.config import TrialConfig
from contracts.dataroot import DataRoot
from contracts.intake import (
    GithubIntake,
    GithubRepo,
    IssueSpecError,
    IssueTask,
    parse_issue_task,
    task_block,
)
from orchestrator.access import AuditLog
from orchestrator.client import ApiError, Client
from orchestrator.export import Exported, export_trial
from orchestrator.mirrors import PROTOCOLS, Mirrors
from orchestrator.state import IntakeComment, IntakeCursor, IntakeIssue, Store, utcnow
from workers.workspace import WorkspaceError, isolated_git

log = logging.getLogger("autovibe.intake.github")

STATES = ("queued", "running", "done", "failed")
LABELS = {state: f"autovibe:{state}" for state in STATES}
SPEC_FILE = ".autovibe.yaml"
ENDED = ("finished", "cancelled")
WHO = "intake:github"
API_VERSION: Final = "2022-11-28"
MAX_PAGES = 10
"""Pages of 100 labelled issues read per repository and poll, at most."""
GONE = (404, 410, 422)
"""GitHub's answers to a comment that can never be posted: no such issue, or not a valid one."""


# -- webhook signatures ----------------------------------------------------------------------


def signature(secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`: HMAC-SHA256 with the secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `header` is the signature of `body` (compared in constant time)."""
    return header is not None and hmac.compare_digest(signature(secret, body), header)


# -- the issues, as read from the REST API or a webhook --------------------------------------


class _Label(BaseModel):
    name: str


class GithubIssue(BaseModel):
    """The fields of an issue this queue reads (REST `issues` object, webhook `issue`)."""

    number: int
    title: str
    body: str | None = None
    labels: list[_Label] = []
    pull_request: dict[str, Any] | None = None
    """Present when the "issue" is a pull request, which the queue never takes."""

    def labelled(self, label: str) -> bool:
        return any(x.name == label for x in self.labels)


class _Repository(BaseModel):
    full_name: str


class IssuesEvent(BaseModel):
    """An `issues` webhook delivery (the fields used)."""

    action: str
    issue: GithubIssue
    repository: _Repository


# -- the REST API, through githubkit ----------------------------------------------------------


@dataclass(frozen=True)
class IssuePage:
    issues: list[GithubIssue]
    etag: str | None


class GithubRateLimited(Exception):
    """Too few requests left (or GitHub said so); nothing is sent until `retry_after_s`."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"GitHub rate limit: waiting {retry_after_s:.0f} s for the reset")
        self.retry_after_s = retry_after_s


class GithubApi:
    """The few REST calls the queue makes, with the rate-limit headers read after each."""

    def __init__(self, token: str, api_url: str, rate_floor: int = 50) -> None:
        self.gh = GitHub(
            token,
            base_url=api_url.rstrip("/") + "/",
            http_cache=False,  # ETags are kept in the state DB, across restarts
            auto_retry=False,  # a rate limit pauses the queue rather than a call
            user_agent="autovibe-intake",
            timeout=30,
        )
        # Pinned: the version the intake was written and tested against (GitHub serves each
        # documented version for at least 24 months after its successor).
        self.rest = self.gh.rest(API_VERSION)
        self.rate_floor = rate_floor
        self.remaining: int | None = None
        self.reset_at = 0.0
        """UNIX time at which the hourly allowance is renewed (`x-ratelimit-reset`)."""

    def _call(self, fn: Callable[..., Response[Any]], *args: Any, **kw: Any) -> Response[Any]:
        now = time.time()
        if self.remaining is not None and self.remaining < self.rate_floor and self.reset_at > now:
            raise GithubRateLimited(self.reset_at - now)
        try:
            resp = fn(*args, **kw)
        except RateLimitExceeded as exc:
            self.remaining, self.reset_at = 0, now + exc.retry_after.total_seconds()
            raise GithubRateLimited(exc.retry_after.total_seconds()) from exc
        headers = resp.headers
        if "x-ratelimit-remaining" in headers:
            self.remaining = int(headers["x-ratelimit-remaining"])
            self.reset_at = float(headers.get("x-ratelimit-reset", now))
        return resp

    def labelled_pages(self, repo: str, label: str, etag: str | None) -> Iterator[IssuePage]:
        """Open issues carrying `label`, 100 a page, the most recently updated first; nothing
        when the first page is unchanged since `etag` (304).

        Labelling an issue updates it, so a newly labelled one is on the first page; the
        following ones (`Link: rel="next"`, at most `MAX_PAGES` in all) are read as long as the
        caller asks for them."""
        owner, name = repo.split("/")
        headers = {"If-None-Match": etag} if etag else None
        query: dict[str, Any] = {"labels": label, "state": "open", "sort": "updated",
                                 "direction": "desc", "per_page": 100}  # fmt: skip
        for number in range(1, MAX_PAGES + 1):
            page = {"page": number} if number > 1 else {}
            resp = self._call(
                self.rest.issues.list_for_repo, owner, name, **query, **page, headers=headers
            )
            if resp.status_code == 304:
                return
            issues = [GithubIssue.model_validate(i) for i in resp.json()]
            yield IssuePage(issues, resp.headers.get("etag"))
            if "next" not in resp.raw_response.links:
                return
            headers = None  # only the first page is asked conditionally

    def default_branch(self, repo: str) -> str:
        owner, name = repo.split("/")
        return str(self._call(self.rest.repos.get, owner, name).json()["default_branch"])

    def file(self, repo: str, path: str, ref: str) -> str | None:
        """A file's text at `ref`, or None when there is none."""
        owner, name = repo.split("/")
        try:
            resp = self._call(self.rest.repos.get_content, owner, name, path, ref=ref)
        except RequestFailed as exc:
            if exc.response.status_code == 404:
                return None
            raise
        doc = resp.json()
        if not isinstance(doc, dict) or doc.get("type") != "file":
            return None
        return base64.b64decode(doc.get("content", "")).decode()

    def comment(self, repo: str, number: int, body: str) -> None:
        owner, name = repo.split("/")
        self._call(self.rest.issues.create_comment, owner, name, number, body=body)

    def add_label(self, repo: str, number: int, label: str) -> None:
        owner, name = repo.split("/")
        self._call(self.rest.issues.add_labels, owner, name, number, labels=[label])

    def remove_label(self, repo: str, number: int, label: str) -> None:
        owner, name = repo.split("/")
        try:
            self._call(self.rest.issues.remove_label, owner, name, number, label)
        except RequestFailed as exc:
            if exc.response.status_code != 404:  # someone took it off already
                raise

    def open_pull_request(self, repo: str, head: str, base: str, title: str, body: str) -> str:
        owner, name = repo.split("/")
        resp = self._call(
            self.rest.pulls.create, owner, name, title=title, head=head, base=base, body=body
        )
        return str(resp.json()["html_url"])


# -- the queue --------------------------------------------------------------------------------


def offer(store: Store, audit: AuditLog, repo: str, issue: GithubIssue, via: str) -> bool:
    """Queue `issue` unless it was taken before (ever); True when newly queued."""
    if issue.pull_request is not None:
        return False
    try:
        with store.session() as s:
            known = s.scalar(
                select(IntakeIssue.id).where(
                    IntakeIssue.repo == repo, IntakeIssue.number == issue.number
                )
            )
            if known is not None:
                return False
            s.add(IntakeIssue(repo=repo, number=issue.number, title=issue.title,
                              body=issue.body or ""))  # fmt: skip
    except IntegrityError:  # queued by another process (the webhook, a poller) just now
        return False
    audit.record(who=WHO, action="queued", repo=repo, issue=issue.number, via=via)
    return True


def trial_name(repo: str, number: int) -> str:
    """The trial's name: unique per issue, so the API's 409 keeps an issue from running twice."""
    slug = re.sub(r"[^a-z0-9]+", "-", repo.lower()).strip("-")[:40].strip("-")
    return f"gh-{slug}-{number}"


@dataclass
class _Outcome:
    state: str
    comment: str
    pull_request: str | None = None


class IssueQueue:
    """Polls, starts and follows the issues of one `GithubIntake` section."""

    def __init__(
        self,
        config: GithubIntake,
        api: GithubApi,
        client: Client,
        store: Store,
        root: DataRoot,
        token: str,
    ) -> None:
        self.config = config
        self.api = api
        self.client = client
        self.store = store
        self.root = root
        self.token = token
        self.audit = AuditLog(root, "intake")
        self.repos = {r.name: r for r in config.repos}

    # -- one round ---------------------------------------------------------------------------

    def step(self) -> None:
        """Poll (when configured), post the comments still owed and show the states, start what
        fits, finish what ended."""
        if self.config.poll:
            self.poll()
        self.post_owed()
        self.show_states()
        self.start_queued()
        self.follow_running()

    def run(self, stop: threading.Event) -> None:
        """`step` every `poll_interval_s` until `stop`; a rate limit waits for the reset."""
        while not stop.is_set():
            wait = self.config.poll_interval_s
            try:
                self.step()
            except GithubRateLimited as exc:
                log.warning("%s", exc)
                wait = max(wait, exc.retry_after_s)
            except (RequestError, ApiError, WorkspaceError, OSError) as exc:
                log.error("intake round failed, retried in %.0f s: %s", wait, exc)
            stop.wait(wait)

    def poll(self) -> int:
        """Queue the labelled open issues not seen before; how many were new."""
        new = 0
        for repo in self.config.repos:
            key = f"github:{repo.name}:issues:{self.config.label}"
            with self.store.session() as s:
                cursor = s.get(IntakeCursor, key)
                etag = cursor.etag if cursor else None
            first: str | None = etag
            for n, page in enumerate(self.api.labelled_pages(repo.name, self.config.label, etag)):
                if n == 0:
                    first = page.etag
                elif n == 1:
                    # Until the last page is read, the next poll is not conditional and reads
                    # them all again: a rate limit halfway loses none.
                    self._save_cursor(key, None)
                fresh = sum(offer(self.store, self.audit, repo.name, i, via="poll")
                            for i in page.issues)  # fmt: skip
                new += fresh
                if etag is not None and not fresh:
                    break  # read whole before: the older pages hold what was seen then
            self._save_cursor(key, first)
        return new

    def _save_cursor(self, key: str, etag: str | None) -> None:
        with self.store.session() as s:
            cursor = s.get(IntakeCursor, key) or IntakeCursor(key=key)
            cursor.etag, cursor.polled_at = etag, utcnow()
            s.add(cursor)

    def show_states(self) -> None:
        """Label every issue whose label does not show its state yet (newly queued, or a label
        call that failed before)."""
        for state in STATES:
            for row in self._rows(state, unlabelled=True):
                self._show(row)

    def post_owed(self, row: IntakeIssue | None = None) -> int:
        """Post the comments owed (to `row`'s issue, or to every issue), oldest first; how many
        went out. One that fails stays owed, with those after it on its issue, for the next
        round; one GitHub can never take (`GONE`) is dropped; a rate limit stops them all."""
        query = (
            select(IntakeComment, IntakeIssue.repo, IntakeIssue.number)
            .join(IntakeIssue, IntakeComment.issue_id == IntakeIssue.id)
            .where(IntakeComment.posted_at.is_(None), IntakeComment.dropped.is_(False))
        )
        if row is not None:
            query = query.where(IntakeComment.issue_id == row.id)
        with self.store.session() as s:
            owed = s.execute(query.order_by(IntakeComment.id)).all()
        stuck: set[int] = set()
        posted = 0
        for comment, repo, number in owed:
            if comment.issue_id in stuck:
                continue  # in order: not before the one that failed
            error, dropped = None, False
            try:
                self.api.comment(repo, number, comment.body)
            except RequestFailed as exc:
                error = f"GitHub answered {exc.response.status_code}"
                dropped = exc.response.status_code in GONE
            except RequestError as exc:  # no answer (refused, reset, timed out)
                error = f"GitHub unreachable: {exc.exc!r}"
            with self.store.session() as s:
                live = s.get_one(IntakeComment, comment.id)
                live.attempts += 1
                live.error, live.dropped = error, dropped
                if error is None:
                    live.posted_at = utcnow()
            if error is None:
                posted += 1
            elif dropped:
                log.error("comment on %s#%s dropped: %s", repo, number, error)
                self.audit.record(
                    who=WHO, action="comment_dropped", repo=repo, issue=number, why=error
                )
            else:
                stuck.add(comment.issue_id)
                log.warning("comment on %s#%s owed, retried next round: %s", repo, number, error)
        return posted

    def start_queued(self) -> None:
        with self.store.session() as s:
            running = s.scalar(
                select(func.count()).select_from(IntakeIssue).where(IntakeIssue.state == "running")
            )
        for row in self._rows("queued")[: max(0, self.config.max_running - (running or 0))]:
            self._start(row)

    def follow_running(self) -> None:
        for row in self._rows("running"):
            if row.trial_id is None:
                continue
            try:
                view = self.client.trial(row.trial_id)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                # Gone from the state DB (removed by hand): said once, never run again.
                self._refuse(row, f"trial {row.trial_id} no longer exists")
                continue
            if view["status"] in ENDED:
                self._finish(row, view)

    # -- transitions -------------------------------------------------------------------------

    def _start(self, row: IntakeIssue) -> None:
        repo = self.repos.get(row.repo)
        if repo is None:
            return  # no longer configured: left queued
        try:
            config = self.trial_for(repo, row)
            try:
                trial = self.client.submit(config.model_dump(mode="json", exclude_none=True))
                trial_id = str(trial["id"])
            except ApiError as exc:
                if exc.status != 409:
                    raise
                trial_id = self._existing_trial(config.name)
        except (IssueSpecError, ValidationError) as exc:
            self._refuse(row, str(exc))
            return
        except ApiError as exc:
            if exc.status in (400, 403, 404, 422):
                self._refuse(row, "; ".join(exc.problems()))
                return
            raise  # the API is down or busy: left queued, tried again next round
        budget = config.budget
        self._update(
            row,
            state="running",
            trial_id=trial_id,
            comment=f"autovibe started trial `{trial_id}` for this issue: project "
            f"`{config.project}`, budget {budget.amount} {budget.currency} ({budget.period}), "
            f"agents {', '.join(config.agents)} × model pairs {', '.join(config.model_pairs)}. "
            "Edits to the issue from now on do not change this run.",
        )
        self.audit.record(
            who=WHO, action="started", repo=row.repo, issue=row.number, trial=trial_id
        )
        self._tell(row)

    def trial_for(self, repo: GithubRepo, row: IntakeIssue) -> TrialConfig:
        """The trial that runs `row`: the template, plus one task on the default branch head."""
        branch = self.api.default_branch(repo.name)
        spec = self._spec(repo, row, branch)
        task: dict[str, Any] = {
            "id": f"issue-{row.number}",
            "repo": repo.url,
            "ref": branch,
            "prompt": f"{row.title}\n\n{row.body}".strip(),
            **spec.model_dump(exclude_none=True),
        }
        if self.config.agent_command is not None:
            task["agent_command"] = self.config.agent_command
        return TrialConfig.model_validate(
            {**self.config.trial, "name": trial_name(repo.name, row.number), "tasks": [task]}
        )

    def _spec(self, repo: GithubRepo, row: IntakeIssue, branch: str) -> IssueTask:
        block = task_block(row.body)
        if block is not None:
            return parse_issue_task(block, "the issue's ```autovibe block")
        text = self.api.file(repo.name, SPEC_FILE, branch)
        if text is None:
            raise IssueSpecError(
                "no task block: add a fenced ```autovibe block to the issue (test_command, "
                f"fail_to_pass, pass_to_pass) or a {SPEC_FILE} to the repository"
            )
        return parse_issue_task(text, f"{SPEC_FILE} on {branch}")

    def _existing_trial(self, name: str) -> str:
        for t in self.client.trials():
            if t["name"] == name:
                return str(t["id"])
        raise ApiError(409, f"a trial named {name!r} exists and cannot be listed")

    def _refuse(self, row: IntakeIssue, why: str) -> None:
        comment = f"autovibe cannot run this issue: {why}"
        self._update(row, state="failed", detail=why, comment=comment)
        self.audit.record(who=WHO, action="refused", repo=row.repo, issue=row.number, why=why)
        self._tell(row)

    def _finish(self, row: IntakeIssue, view: dict[str, Any]) -> None:
        assert row.trial_id is not None
        outcome = self._outcome(row, view)
        self._update(row, state=outcome.state, detail=outcome.pull_request, comment=outcome.comment)
        self.audit.record(
            who=WHO, action=outcome.state, repo=row.repo, issue=row.number, trial=row.trial_id,
            pull_request=outcome.pull_request,
        )  # fmt: skip
        self._tell(row)

    def _outcome(self, row: IntakeIssue, view: dict[str, Any]) -> _Outcome:
        assert row.trial_id is not None
        lines = [
            f"autovibe trial `{row.trial_id}` {view['status']}: spent "
            f"{view['spend']['amount']} {view['spend']['currency']} of "
            f"{view['spend']['budget']}.",
            "",
            "| agent × model | status | cost | confidence |",
            "|---|---|---|---|",
        ]
        for a in view["assignments"]:
            conf = a.get("confidence") or {}
            score = conf.get("score")
            lines.append(
                f"| {a['agent']} × {a['model']} | {a['status'] or a['state']} | "
                f"{a['cost'] or '-'} | {'-' if score is None else f'{score:.2f}'} |"
            )
        exported = self._export(row)
        if not exported:
            lines += ["", "No accepted patch."]
            return _Outcome("failed", "\n".join(lines))
        best = max(exported, key=lambda e: e.confidence or 0.0)
        pr = None
        if self.config.pull_requests:
            try:
                pr = self._pull_request(row, best)
                lines += ["", f"Accepted patch ({best.assignment}): {pr}"]
            except (WorkspaceError, RequestFailed) as exc:
                # The result still goes back; the patch stays in the data root to export.
                why = str(exc).replace(self.token, "[REDACTED]")
                lines += ["", f"Accepted patch ({best.assignment}); no pull request: {why}"]
        else:
            lines += ["", f"Accepted patch: assignment {best.assignment}."]
        return _Outcome("done", "\n".join(lines), pr)

    def _export(self, row: IntakeIssue) -> list[Exported]:
        """The accepted, non-empty patches of the row's trial (as patch files)."""
        assert row.trial_id is not None
        out = self.root.root / "intake" / "github" / row.trial_id
        done = export_trial(self.store, self.root, row.trial_id, out)
        return [e for e in done if e.outcome == "patch"]

    def _pull_request(self, row: IntakeIssue, best: Exported) -> str:
        """Branch `autovibe/issue-N` (the base commit plus the patch), pushed, and its PR."""
        assert row.trial_id is not None
        repo = self.repos[row.repo]
        base = self.api.default_branch(repo.name)
        mirror = Mirrors(self.root).mirror(repo.url)
        name = f"autovibe/issue-{row.number}"
        with tempfile.TemporaryDirectory(prefix="av-intake-") as tmp:
            # A shared bare clone of the mirror: the branch is made and pushed from there, so
            # the mirror keeps only what the remote has.
            work = Path(tmp) / "repo.git"
            isolated_git(Path(tmp), "clone", "--quiet", "--bare", "--shared", str(mirror),
                         str(work), cwd=Path(tmp))  # fmt: skip
            out = self.root.root / "intake" / "github" / row.trial_id
            done = export_trial(
                self.store, self.root, row.trial_id, out / "branch", branch=name, repo=work
            )
            branch = next(
                (e.detail for e in done
                 if e.outcome == "branch" and e.assignment == best.assignment),
                None,
            )  # fmt: skip
            if branch is None:
                raise WorkspaceError(f"no branch made for {best.assignment}")
            isolated_git(
                work, "push", "--quiet", "--end-of-options", repo.url,
                f"refs/heads/{branch}:refs/heads/{branch}", env=self._push_env(repo.url),
                timeout_s=300,
            )  # fmt: skip
        body = (
            f"Fixes #{row.number}.\n\nWritten by autovibe trial `{row.trial_id}` "
            f"(assignment {best.assignment}, confidence {best.confidence})."
        )
        url = self.api.open_pull_request(repo.name, branch, base, f"autovibe: {row.title}", body)
        self.audit.record(
            who=WHO, action="pull_request", repo=row.repo, issue=row.number, url=url, branch=branch
        )
        return url

    def _push_env(self, url: str) -> dict[str, str]:
        env = {"GIT_ALLOW_PROTOCOL": PROTOCOLS}
        if url.startswith(("https://", "http://")):
            # The token travels as a header from the environment: never in a URL or an argv.
            basic = base64.b64encode(f"x-access-token:{self.token}".encode()).decode()
            env |= {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
            }
        return env

    # -- rows and labels ---------------------------------------------------------------------

    def _rows(self, state: str, unlabelled: bool = False) -> list[IntakeIssue]:
        with self.store.session() as s:
            query = select(IntakeIssue).where(IntakeIssue.state == state)
            if unlabelled:
                query = query.where(
                    (IntakeIssue.label.is_(None)) | (IntakeIssue.label != LABELS[state])
                )
            return list(s.scalars(query.order_by(IntakeIssue.id)))

    def _update(self, row: IntakeIssue, comment: str | None = None, **values: Any) -> None:
        """Set `values` on the row; `comment` is owed to the issue from the same transaction,
        so a state change is never made without what it tells the issue."""
        with self.store.session() as s:
            live = s.get(IntakeIssue, row.id)
            assert live is not None
            for k, v in values.items():
                setattr(live, k, v)
                setattr(row, k, v)
            live.updated_at = utcnow()
            if comment is not None:
                s.add(IntakeComment(issue_id=row.id, body=comment))

    def _tell(self, row: IntakeIssue) -> None:
        """After a state change: its comment posted (or left owed), its label shown."""
        self.post_owed(row)
        self._show(row)

    def _show(self, row: IntakeIssue) -> None:
        """The row's state as the issue's label; a failure is left to the next round's
        `show_states` (a rate limit stops the round)."""
        try:
            self._set_label(row, row.state)
        except RequestError as exc:
            log.warning("label of %s#%s not set, tried next round: %r", row.repo, row.number, exc)

    def _set_label(self, row: IntakeIssue, state: str) -> None:
        """Show `state` on the issue: its label added, the one set before taken off."""
        label = LABELS[state]
        self.api.add_label(row.repo, row.number, label)
        if row.label and row.label != label:
            self.api.remove_label(row.repo, row.number, row.label)
        self._update(row, label=label)
        self.audit.record(who=WHO, action="label", repo=row.repo, issue=row.number, label=label)
