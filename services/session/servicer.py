"""gRPC adapter for the session store: proto in, domain call, proto out."""

from __future__ import annotations

from typing import Any

import grpc.aio

from services.session.calibration import Calibrations
from services.session.chain import verify_chain
from services.session.context import build_context
from services.session.erasure import Erasures
from services.session.retention import Retention
from services.session.store import MAX_PAGE_SIZE, SessionStore
from services.session.tokens import TokenEstimator, calibrated_estimator
from services.session.validation import validate_session_fields
from threadline import errors
from threadline.events import EventPublisher
from threadline.ids import validate_session_id
from threadline.logs import get_logger
from threadline.v1 import session_pb2, session_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

log = get_logger("threadline.session")


def _require_tenant(tenant: str) -> None:
    if not tenant:
        raise errors.InvalidArgument("tenant is required")


def _check_calibration(calibration: session_pb2.CalibrateRequest, prefix: str = "") -> None:
    if not calibration.model:
        raise errors.InvalidArgument(f"{prefix}model is required")
    if calibration.prompt_chars <= 0 or calibration.prompt_tokens <= 0:
        raise errors.InvalidArgument(
            f"{prefix}prompt_chars and {prefix}prompt_tokens must be > 0, got "
            f"{calibration.prompt_chars} and {calibration.prompt_tokens}"
        )


class SessionsServicer(session_pb2_grpc.SessionsServicer):
    def __init__(
        self,
        store: SessionStore,
        estimator: TokenEstimator,
        events: EventPublisher,
        retention: Retention,
    ) -> None:
        self.store = store
        self.calibrations = Calibrations(store)
        self.erasures = Erasures(store, events)
        self.estimator = estimator
        self.events = events
        self.retention = retention

    async def Create(
        self, request: session_pb2.SessionsCreateRequest, context: Context
    ) -> session_pb2.Session:
        _require_tenant(request.tenant)
        if request.compacted_from:
            validate_session_id(request.compacted_from)
            await self.store.get(request.tenant, request.compacted_from)
        else:
            # A compaction copies a stored session's fields, which may predate the limits.
            validate_session_fields(
                title=request.title, model=request.model, metadata=request.metadata
            )
        session = await self.store.create(
            tenant=request.tenant,
            model=request.model,
            system_prompt=request.system_prompt,
            title=request.title,
            metadata=dict(request.metadata),
            compacted_from=request.compacted_from,
            messages=list(request.messages),
        )
        await self._added(
            "session.created",
            session.tenant,
            session.id,
            compacted_from=request.compacted_from or None,
            messages=len(request.messages) or None,
        )
        return session

    async def Get(
        self, request: session_pb2.SessionsGetRequest, context: Context
    ) -> session_pb2.SessionDetail:
        _require_tenant(request.tenant)
        validate_session_id(request.session_id)
        if request.from_seq < 0:
            raise errors.InvalidArgument(f"from_seq must be >= 0, got {request.from_seq}")
        session = await self.store.get(request.tenant, request.session_id)
        detail = session_pb2.SessionDetail(session=session)
        if request.verify_chain:
            messages = await self.store.messages(request.tenant, request.session_id)
            verify_chain(messages)
            if messages and messages[-1].hash != session.head:
                raise errors.DataLoss(
                    f"session {session.id}: head {session.head} does not match the last "
                    f"message's hash {messages[-1].hash}"
                )
            detail.chain_verified = True
            if request.include_messages:
                detail.messages.extend(m for m in messages if m.seq >= request.from_seq)
        elif request.include_messages:
            detail.messages.extend(
                await self.store.messages(
                    request.tenant, request.session_id, from_seq=request.from_seq
                )
            )
        return detail

    async def List(
        self, request: session_pb2.SessionsListRequest, context: Context
    ) -> session_pb2.SessionList:
        _require_tenant(request.tenant)
        if request.page_size < 0:
            raise errors.InvalidArgument(f"page_size must be >= 0, got {request.page_size}")
        sessions, token = await self.store.list(
            request.tenant, page_size=request.page_size, page_token=request.page_token
        )
        return session_pb2.SessionList(sessions=sessions, next_page_token=token)

    async def Append(
        self, request: session_pb2.AppendRequest, context: Context
    ) -> session_pb2.AppendResponse:
        _require_tenant(request.tenant)
        validate_session_id(request.session_id)
        calibration = request.calibration if request.HasField("calibration") else None
        if calibration is not None:
            _check_calibration(calibration, "calibration.")
        head, stored = await self.store.append(
            request.tenant,
            request.session_id,
            request.expected_head,
            list(request.messages),
            request_id=request.request_id,
        )
        if calibration is not None:
            await self._calibrate_after_append(calibration)
        return session_pb2.AppendResponse(head=head, messages=stored)

    async def BuildContext(
        self, request: session_pb2.BuildContextRequest, context: Context
    ) -> session_pb2.BuildContextResponse:
        _require_tenant(request.tenant)
        validate_session_id(request.session_id)
        if request.budget_tokens <= 0:
            raise errors.InvalidArgument(f"budget_tokens must be > 0, got {request.budget_tokens}")
        if not 0 <= request.reserve_output_tokens < request.budget_tokens:
            raise errors.InvalidArgument(
                f"reserve_output_tokens must be in [0, budget_tokens), got "
                f"{request.reserve_output_tokens}"
            )
        ratio = await self.calibrations.ratio(request.model) if request.model else None
        result = await build_context(
            self.store,
            request.tenant,
            request.session_id,
            budget_tokens=request.budget_tokens,
            reserve_output_tokens=request.reserve_output_tokens,
            memory_summary=request.memory_summary,
            estimator=calibrated_estimator(ratio, self.estimator),
            keep_recent_min=request.keep_recent_min,
        )
        dropped_from, dropped_until = result.dropped_range
        if result.dropped_count:
            self.events.emit(
                "session.truncated",
                tenant=request.tenant,
                session_id=request.session_id,
                dropped=result.dropped_count,
                dropped_from_seq=dropped_from,
                dropped_until_seq=dropped_until,
                kept=len(result.messages),
                budget_tokens=request.budget_tokens,
            )
        return session_pb2.BuildContextResponse(
            messages=result.messages,
            token_estimate=result.token_estimate,
            dropped_count=result.dropped_count,
            head=result.head,
            dropped_from_seq=dropped_from,
            dropped_until_seq=dropped_until,
        )

    async def Fork(self, request: session_pb2.ForkRequest, context: Context) -> session_pb2.Session:
        _require_tenant(request.tenant)
        validate_session_id(request.session_id)
        fork = await self.store.fork(request.tenant, request.session_id, request.at_hash)
        await self._added(
            "session.forked",
            request.tenant,
            fork.id,
            forked_from=request.session_id,
            at_hash=request.at_hash,
            messages=fork.message_count,
        )
        return fork

    async def Delete(
        self, request: session_pb2.DeleteRequest, context: Context
    ) -> session_pb2.DeleteResponse:
        _require_tenant(request.tenant)
        validate_session_id(request.session_id)
        deleted = await self.erasures.delete(
            request.tenant,
            request.session_id,
            reason="deleted",
            with_descendants=request.with_descendants,
        )
        return session_pb2.DeleteResponse(deleted_session_ids=deleted)

    async def ListDerived(
        self, request: session_pb2.ListDerivedRequest, context: Context
    ) -> session_pb2.SessionList:
        _require_tenant(request.tenant)
        validate_session_id(request.session_id)
        sessions = await self.erasures.descendants(request.tenant, request.session_id)
        return session_pb2.SessionList(sessions=sessions)

    async def EraseTenant(
        self, request: session_pb2.EraseTenantRequest, context: Context
    ) -> session_pb2.EraseTenantResponse:
        _require_tenant(request.tenant)
        erased = await self.erasures.erase_tenant(request.tenant)
        return session_pb2.EraseTenantResponse(sessions=erased)

    async def PendingErasures(
        self, request: session_pb2.PendingErasuresRequest, context: Context
    ) -> session_pb2.PendingErasuresResponse:
        if not 0 <= request.limit <= MAX_PAGE_SIZE:
            raise errors.InvalidArgument(f"limit must be 0 to {MAX_PAGE_SIZE}, got {request.limit}")
        response = session_pb2.PendingErasuresResponse()
        for erasure in await self.erasures.pending(request.owner, request.limit):
            item = response.erasures.add(
                session_id=erasure.session_id, tenant=erasure.tenant, reason=erasure.reason
            )
            item.deleted_at.FromMicroseconds(erasure.deleted_at)
        return response

    async def ErasedAmong(
        self, request: session_pb2.ErasedAmongRequest, context: Context
    ) -> session_pb2.ErasedAmongResponse:
        erased = await self.store.erased_among(list(request.session_ids))
        return session_pb2.ErasedAmongResponse(session_ids=erased)

    async def AcknowledgeErasure(
        self, request: session_pb2.AcknowledgeErasureRequest, context: Context
    ) -> session_pb2.AcknowledgeErasureResponse:
        completed = await self.erasures.acknowledge(
            request.owner, request.session_id, dict(request.removed)
        )
        return session_pb2.AcknowledgeErasureResponse(completed=completed)

    async def Export(
        self, request: session_pb2.ExportRequest, context: Context
    ) -> session_pb2.ExportResponse:
        _require_tenant(request.tenant)
        validate_session_id(request.session_id)
        lines = await self.store.export(request.tenant, request.session_id)
        return session_pb2.ExportResponse(lines=lines)

    async def Import(
        self, request: session_pb2.ImportRequest, context: Context
    ) -> session_pb2.Session:
        _require_tenant(request.tenant)
        if not request.lines:
            raise errors.InvalidArgument("lines is empty: send an exported session")
        session = await self.store.import_session(request.tenant, list(request.lines))
        await self._added(
            "session.created",
            request.tenant,
            session.id,
            imported=True,
            messages=session.message_count,
        )
        return session

    async def Calibrate(
        self, request: session_pb2.CalibrateRequest, context: Context
    ) -> session_pb2.CalibrateResponse:
        _check_calibration(request)
        ratio = await self.calibrations.measured(
            request.model, request.prompt_chars, request.prompt_tokens
        )
        return session_pb2.CalibrateResponse(chars_per_token=ratio)

    async def _calibrate_after_append(self, calibration: session_pb2.CalibrateRequest) -> None:
        # The messages are stored: a calibration that fails now must not fail the
        # append (its caller would send it again); the ratio is only an estimate's.
        try:
            await self.calibrations.measured(
                calibration.model, calibration.prompt_chars, calibration.prompt_tokens
            )
        except errors.ThreadlineError as exc:
            log.warning("session.calibration_failed", model=calibration.model, error=exc.message)

    async def _added(self, event_type: str, tenant: str, session_id: str, **attrs: Any) -> None:
        """Announce a session this call made, then hold its tenant to the session cap."""
        self.events.emit(event_type, tenant=tenant, session_id=session_id, **attrs)
        await self.retention.enforce_cap(tenant)
