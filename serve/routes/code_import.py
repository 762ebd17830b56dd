"""Importing a shop's own codes into a campaign: streamed, chunk by chunk, to the codes'
owner shards, with a report of every refused line."""

import hashlib
from typing import Annotated, Any

from fastapi import Request

from engine.audit import Actor
from engine.code_import import code_parser
from engine.customers import FieldError
from engine.events import ImportedCode
from serve.auth import Principal, actor_of
from serve.models import ImportOut
from serve.problems import problem_responses
from serve.routes.deps import GUARDED, Svc, require, router

routes = router()

Generator = Annotated[Principal, require("campaigns.generate")]

CHUNK = 20_000  # codes per call to the coordinator
MAX_REPORTED = 1000


def _digest(code: str) -> int:
    """Eight bytes standing for a code in the file's duplicate check (about 60 bytes of
    memory per line instead of the code itself)."""
    return int.from_bytes(hashlib.blake2b(code.encode(), digest_size=8).digest(), "big")


class _Report:
    def __init__(self) -> None:
        self.imported = 0
        self.rejected = 0
        self.rejections: list[dict[str, Any]] = []

    def refuse(self, line: int, field: str, reason: str) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REPORTED:
            self.rejections.append({"line": line, "field": field, "reason": reason})


@routes.post(
    "/v1/campaigns/{campaign_id}/vouchers/import",
    response_model=ImportOut,
    tags=["vouchers"],
    responses=problem_responses(*GUARDED, 400, 404, 409, 413, 415, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
)
async def import_codes(campaign_id: str, request: Request, caller: Generator, svc: Svc) -> Any:
    """Bring a shop's own codes (printed, partner, legacy) into a campaign from CSV (a header
    naming ``code`` and any of ``customer_id``, ``expires_at``, ``metadata``) or JSON lines.
    Read as it streams in; each code goes to its owner shard and then behaves like a
    generated one (a code with a customer is theirs; ``expires_at`` is its own end). Each
    refused line is reported with its line, field and reason: malformed, a duplicate
    earlier in the file, a code that exists in any campaign, over ``limits.total`` or over
    the shards' memory."""
    parser = code_parser(request.headers.get("content-type"))  # 415 before reading
    await svc.engine.campaign(campaign_id)  # 404 before reading
    report = _Report()
    seen: set[int] = set()
    chunk: list[ImportedCode] = []
    lines: dict[str, int] = {}

    async def flush() -> None:
        if not chunk:
            return
        answer = await svc.engine.import_codes(campaign_id, list(chunk))
        report.imported += answer["imported"]
        for code, reason in answer["refused"].items():
            report.refuse(lines[code], "code", f"{code}: {reason}")
        chunk.clear()
        lines.clear()

    async def take(rows: list[tuple[int, Any]]) -> None:
        for line, row in rows:
            if not isinstance(row, ImportedCode):
                problems: list[FieldError] = row
                report.rejected += 1
                for p in problems:
                    if len(report.rejections) < MAX_REPORTED:
                        report.rejections.append({"line": line, "field": p.field, "reason": p.reason})
                continue
            digest = _digest(row.code)
            if digest in seen:
                report.refuse(line, "code", f"{row.code}: a duplicate of a code earlier in the file")
                continue
            seen.add(digest)
            chunk.append(row)
            lines[row.code] = line
            if len(chunk) >= CHUNK:
                await flush()

    async for data in request.stream():
        if data:
            await take(parser.feed(data))
    await take(parser.finish())
    await flush()
    await _audit(svc, actor_of(caller), campaign_id, parser.rows, report)
    return {
        "rows": parser.rows,
        "imported": report.imported,
        "rejected": report.rejected,
        "rejections": report.rejections,
        "rejections_truncated": report.rejected > len(report.rejections),
    }


async def _audit(svc: Svc, actor: Actor, campaign_id: str, rows: int, report: _Report) -> None:
    from store import audit

    change = {"rows": rows, "imported": report.imported, "rejected": report.rejected}
    await audit.record(await svc.import_db(), actor, "vouchers.import", "campaign", campaign_id, change)
