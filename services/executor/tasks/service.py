"""Submitting background tasks: input checks, classification, workspace, the pool."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from services.executor.tasks.classifier import Classifier
from services.executor.tasks.erasure import TaskErasure
from services.executor.tasks.pool import TaskPool
from services.executor.tasks.records import (
    LogWriter,
    Runner,
    RunOutcome,
    TaskRecord,
    new_task_id,
)
from services.executor.tasks.workspaces import TaskWorkspaces
from threadline import errors
from threadline.config import AgentTypeSettings

_WORKSPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_PROMPT_CHARS = 100_000


class ByAgentType:
    """One runner kind (local, command) configured per agent type."""

    def __init__(self, name: str, runners: Mapping[str, Runner]) -> None:
        self.name = name
        self._runners = dict(runners)

    async def run(self, task: TaskRecord, log: LogWriter) -> RunOutcome:
        runner = self._runners.get(task.agent_type)
        if runner is None:
            return RunOutcome("failed", f"agent type {task.agent_type!r} is no longer configured")
        return await runner.run(task, log)


@dataclass
class TaskService:
    pool: TaskPool
    classifier: Classifier
    agent_types: Mapping[str, AgentTypeSettings]
    workspaces: TaskWorkspaces
    #: Deleting tasks, by id or by tenant, and their retention.
    erasure: TaskErasure

    async def submit(
        self,
        tenant: str,
        prompt: str,
        *,
        agent_type: str = "",
        workspace: str = "",
        budget_tokens: int = 0,
    ) -> TaskRecord:
        if not tenant:
            raise errors.InvalidArgument("tenant is required")
        if not prompt.strip():
            raise errors.InvalidArgument("prompt is empty: say what the task should do")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise errors.InvalidArgument(
                f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}"
            )
        if budget_tokens < 0:
            raise errors.InvalidArgument(f"budget_tokens must be >= 0, got {budget_tokens}")
        if workspace and _WORKSPACE_NAME.fullmatch(workspace) is None:
            raise errors.InvalidArgument(
                f"workspace {workspace!r} must be a plain directory name (letters, digits, "
                ". _ -), not a path"
            )
        reason = ""
        if agent_type:
            if agent_type not in self.agent_types:
                known = ", ".join(sorted(self.agent_types))
                raise errors.InvalidArgument(
                    f"unknown agent_type {agent_type!r}: known types are {known}"
                )
        else:
            chosen = await self.classifier.classify(prompt, tenant=tenant)
            agent_type = chosen.agent_type
            reason = f"classifier: {chosen.reasons}" + (" (default)" if chosen.fell_back else "")
        task_id = new_task_id()
        # Tenants never share a workspace: the name is scoped under the tenant.
        directory = self.workspaces.directory(tenant, workspace or task_id)
        record = TaskRecord(
            id=task_id,
            tenant=tenant,
            prompt=prompt,
            agent_type=agent_type,
            runner=self.agent_types[agent_type].runner,
            workspace=str(directory),
            reason=reason,
            model=self.agent_types[agent_type].model,
            budget_tokens=budget_tokens,
        )
        return await self.pool.submit(record)
