"""The OpenAPI 3.1 document of the HTTP API, kept by hand next to the handler."""

from __future__ import annotations

from typing import Any

from . import __version__
from ._control import MAX_RETRY_IDS
from ._query import MAX_LIMIT, MAX_VERSION

_UUID = {"type": "string", "format": "uuid"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(
    description: str,
    ref: str,
    headers: dict[str, Any] | None = None,
    links: dict[str, Any] | None = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }
    if headers:
        response["headers"] = headers
    if links:
        response["links"] = links
    return response


_BATCH_ID = {"name": "batchId", "in": "path", "required": True, "schema": _UUID}

_SESSION = {
    "Set-Cookie": {
        "description": "The anonymous session cookie `batchtrack_session` (`HttpOnly`, "
        "`SameSite=Lax`), issued when the request carried none; uploads and batches "
        "belong to it.",
        "schema": {"type": "string"},
    }
}
"""The headers every answer of an operation that identifies its caller may carry."""

_BATCH_LINKS = {
    operation_id: {
        "operationId": operation_id,
        "parameters": {"batchId": "$response.body#/batchId"},
    }
    for operation_id in (
        "getBatchStatus",
        "getBatchEvents",
        "cancelBatch",
        "retryBatch",
        "pauseBatch",
        "unpauseBatch",
    )
}
"""Where the ``batchId`` of a started (or retried) batch leads."""

_STATUS_URL = {
    "Location": {
        "description": "The batch's status URL, as `statusUrl`.",
        "required": True,
        "schema": {"type": "string"},
    }
}

_CROSS_ORIGIN = _error(
    "`cross_origin`: sent by another site's page (its `Sec-Fetch-Site` or `Origin`); "
    "refused for session-cookie callers."
)

_JSON_BYTES_PER_ID = len('"00000000-0000-0000-0000-000000000000", ')
_JSON_ENVELOPE = 32  # `{"fileIds": [` ... `]}` with room to spare


_ITEM_CONDITIONS: list[dict[str, Any]] = [
    {
        "name": "status",
        "in": "query",
        "description": "Only images with this status.",
        "schema": {"enum": ["pending", "processing", "completed", "failed", "cancelled"]},
    },
    {
        "name": "limit",
        "in": "query",
        "description": "At most this many images; the body then carries `nextAfter`.",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
    },
    {
        "name": "after",
        "in": "query",
        "description": "Only images created after this one (the `nextAfter` of a page).",
        "schema": _UUID,
    },
    {
        "name": "since",
        "in": "query",
        "description": "Only images changed after this batch `version`.",
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_VERSION},
    },
]
_LIST_CONDITIONS: list[dict[str, Any]] = [
    {
        "name": "status",
        "in": "query",
        "description": "Only batches with this status.",
        "schema": {"enum": ["pending", "processing", "completed", "failed", "cancelled", "paused"]},
    },
    {
        "name": "limit",
        "in": "query",
        "description": "At most this many batches (default 100).",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
    },
    {
        "name": "after",
        "in": "query",
        "description": "The `nextAfter` of the previous page: the batches created before that one.",
        "schema": _UUID,
    },
]
_TEXT = "^[^\\u0000]*$"  # no NUL
_METADATA: dict[str, Any] = {
    "description": "String pairs kept with the batch: at most 16, keys of 1 to 64 "
    "characters, values of up to 512.",
    "type": "object",
    "maxProperties": 16,
    "propertyNames": {"minLength": 1, "maxLength": 64, "pattern": _TEXT},
    "additionalProperties": {"type": "string", "maxLength": 512, "pattern": _TEXT},
}
_DELTA: dict[str, Any] = {
    "name": "delta",
    "in": "query",
    "description": "1: the whole body once, then only the images changed (with `version`).",
    "schema": {"enum": ["0", "1"]},
}


def _ids_that_fit(max_json_bytes: int) -> int:
    """How many UUIDs a JSON body of at most ``max_json_bytes`` surely has room for."""
    return max(1, (max_json_bytes - _JSON_ENVELOPE) // _JSON_BYTES_PER_ID)


def _with_session(responses: dict[str, Any]) -> dict[str, Any]:
    """``responses``, each also documenting the session cookie it may set."""
    return {
        status: {**response, "headers": {**response.get("headers", {}), **_SESSION}}
        for status, response in responses.items()
    }


def document(base: str, max_files: int, max_json_bytes: int = 64 * 1024) -> dict[str, Any]:
    """The document, with ``base`` (mount point + prefix) as the server URL.

    ``max_files`` and ``max_json_bytes`` are the app's limits. A list of ids is documented
    no longer than a JSON body within ``max_json_bytes`` can hold: a longer one could only
    come in a body the server refuses as too large (413), whatever its ``maxItems``.
    """
    max_ids = _ids_that_fit(max_json_bytes)
    item = {
        "type": "object",
        "required": ["id", "filename", "status"],
        "properties": {
            "id": {"type": "string"},
            "filename": {"type": "string"},
            "status": {"enum": ["pending", "processing", "completed", "failed", "cancelled"]},
            "error": {"type": "string", "description": "Only on failed items."},
            "attempts": {
                "type": "integer",
                "minimum": 2,
                "description": "How many times the item was started since it was created or "
                "last retried; only when more than once.",
            },
            "progress": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "How far a processing item is, as its processor reported; "
                "only while it is processing and has reported.",
            },
            "stage": {
                "type": "string",
                "maxLength": 100,
                "description": "What the processing item is doing, when its last report said.",
            },
        },
        "additionalProperties": False,
    }
    count = {"type": "integer", "minimum": 0}
    # One server-sent event, as an EventSource parses it. Open API 3.1 has no word for
    # the items of a stream (3.2 has `itemSchema`); tools read a 3.1 `text/event-stream`
    # schema as describing each event, as schemathesis does.
    event = {
        "description": "One event; a `: keep-alive` comment comes every 15 s between events. "
        "When the store cannot be read the stream ends with an `unavailable` event (its "
        "`data` the error body, no `id`) and `retry`: reconnect then.",
        "type": "object",
        "required": ["data"],
        "properties": {
            "id": {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "The batch version; on every status event.",
            },
            "event": {
                "enum": ["message", "unavailable"],
                "description": "`message` is not sent: the default type.",
            },
            "retry": {
                "type": "integer",
                "minimum": 0,
                "description": "Milliseconds to wait before reconnecting: on the first "
                "event and on `unavailable`.",
            },
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/BatchStatus"},
            },
        },
    }
    timestamp = {"type": "string", "format": "date-time"}
    status_headers = {
        "ETag": {"required": True, "schema": {"type": "string"}},
        "Cache-Control": {"required": True, "schema": {"const": "no-store"}},
    }
    timeout = _error("`request_timeout`: the body did not arrive in time.")
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "batchtrack",
            "version": __version__,
            "description": "Upload images, process them as a batch, follow its progress.",
        },
        "servers": [{"url": base or "/"}],
        "paths": {
            "/upload": {
                "post": {
                    "operationId": "uploadFiles",
                    "summary": "Upload files (field `files`, repeatable).",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "files": {
                                            "type": "array",
                                            "items": {"type": "string", "format": "binary"},
                                            "minItems": 1,
                                            "maxItems": max_files,
                                        }
                                    },
                                    "required": ["files"],
                                }
                            }
                        },
                    },
                    "responses": _with_session(
                        {
                            "201": _json(
                                "Stored.",
                                "Uploaded",
                                links={
                                    "processBatch": {
                                        "operationId": "processBatch",
                                        "requestBody": {"fileIds": ["$response.body#/files/0/id"]},
                                    }
                                },
                            ),
                            "400": _error("No files, too many files, or a malformed body."),
                            "408": timeout,
                            "413": _error("A file or the body is too large."),
                            "415": _error("Not multipart/form-data."),
                            "429": {
                                **_error(
                                    "`too_many_uploads`: this client uploaded its quota of "
                                    "bytes for the window; nothing of the request was kept."
                                ),
                                "headers": {
                                    "Retry-After": {
                                        "description": "Seconds until the client has room again.",
                                        "required": True,
                                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                                    }
                                },
                            },
                            "507": _error(
                                "`storage_full`: the server's upload storage (or its disk) is "
                                "full; nothing of the request was kept."
                            ),
                        }
                    ),
                }
            },
            "/process-batch": {
                "post": {
                    "operationId": "processBatch",
                    "summary": "Start processing uploaded files as one batch.",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "description": (
                                "Makes the request safe to repeat: the same key (same owner) "
                                "within 24 hours answers 202 with the batch it started first, "
                                "while that batch lives, and starts nothing."
                            ),
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 255,
                                "pattern": "^[ -~]+$",
                            },
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["fileIds"],
                                    "properties": {
                                        "fileIds": {
                                            "type": "array",
                                            "items": _UUID,
                                            "minItems": 1,
                                            "maxItems": min(max_files, max_ids),
                                            "uniqueItems": True,
                                        },
                                        "metadata": {
                                            "oneOf": [
                                                {"$ref": "#/components/schemas/Metadata"},
                                                {"type": "null"},
                                            ]
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": _with_session(
                        {
                            "202": _json("Started.", "Started", _STATUS_URL, _BATCH_LINKS),
                            "400": _error(
                                "Bad JSON or bad, duplicate or too many file ids, a "
                                "malformed Idempotency-Key (`bad_idempotency_key`), or "
                                "metadata that breaks a rule (`bad_metadata`)."
                            ),
                            "404": _error("A file id is unknown, expired or not yours."),
                            "409": _error(
                                "`idempotency_conflict`: the Idempotency-Key was used for "
                                "other fileIds."
                            ),
                            "408": timeout,
                            "413": _error("The body is too large."),
                            "415": _error("Not JSON."),
                            "501": _error(
                                "`idempotency_not_supported`: an Idempotency-Key was sent "
                                "and the server's runner takes none; "
                                "`metadata_not_supported`: metadata was sent and the "
                                "server's runner takes none."
                            ),
                            "503": _error("The service is shutting down."),
                        }
                    ),
                }
            },
            "/batches": {
                "get": {
                    "operationId": "listBatches",
                    "summary": "Your batches, newest first, a page at a time.",
                    "parameters": _LIST_CONDITIONS,
                    "responses": _with_session(
                        {
                            "200": _json(
                                "A page of your batches (status bodies without `images`).",
                                "BatchList",
                                {"Cache-Control": status_headers["Cache-Control"]},
                            ),
                            "400": _error("A bad query parameter (`invalid_query`)."),
                            "404": _error(
                                "`after_not_found`: `after` names none of your batches "
                                "(unknown, or expired and removed since): start again "
                                "from the first page."
                            ),
                        }
                    ),
                }
            },
            "/batch-status/{batchId}": {
                "get": {
                    "operationId": "getBatchStatus",
                    "summary": "The batch's status, progress, items and ETA.",
                    "parameters": [
                        _BATCH_ID,
                        *_ITEM_CONDITIONS,
                        {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                    ],
                    "responses": _with_session(
                        {
                            "200": _json(
                                "The status.",
                                "BatchStatus",
                                status_headers,
                                {
                                    "getBatchResult": {
                                        "operationId": "getBatchResult",
                                        "parameters": {
                                            "batchId": "$response.body#/batchId",
                                            "itemId": "$response.body#/images/0/id",
                                        },
                                    }
                                },
                            ),
                            "304": {
                                "description": "Unchanged since the ETag given.",
                                "headers": status_headers,
                            },
                            "400": _error(
                                "Not a UUID, or a bad query parameter (`invalid_query`)."
                            ),
                            "404": _error(
                                "Unknown, expired or not yours; or `after` names no image "
                                "of the batch (`item_not_found`)."
                            ),
                        }
                    ),
                }
            },
            "/batch-events/{batchId}": {
                "get": {
                    "operationId": "getBatchEvents",
                    "summary": "Server-sent events: the status body at every change.",
                    "parameters": [_BATCH_ID, _DELTA],
                    "responses": _with_session(
                        {
                            "200": {
                                "description": "One `data:` event per change; "
                                "closes when finished.",
                                "headers": {
                                    "Cache-Control": {
                                        "required": True,
                                        "schema": {"const": "no-store"},
                                    },
                                    "X-Accel-Buffering": {
                                        "description": "Asks proxies not to buffer the stream.",
                                        "schema": {"const": "no"},
                                    },
                                },
                                "content": {"text/event-stream": {"schema": event}},
                            },
                            "400": _error("Not a UUID."),
                            "404": _error("Unknown, expired or not yours."),
                        }
                    ),
                }
            },
            "/batch-results/{batchId}/{itemId}": {
                "get": {
                    "operationId": "getBatchResult",
                    "summary": "Download the processed file of a completed item.",
                    "parameters": [
                        _BATCH_ID,
                        {"name": "itemId", "in": "path", "required": True, "schema": _UUID},
                    ],
                    "responses": _with_session(
                        {
                            "200": {
                                "description": "The file.",
                                "headers": {
                                    "Content-Disposition": {
                                        "description": "`attachment`, named after the "
                                        "uploaded file with the result's extension.",
                                        "required": True,
                                        "schema": {"type": "string"},
                                    },
                                    "Cache-Control": {
                                        "required": True,
                                        "schema": {"const": "private, max-age=3600"},
                                    },
                                },
                                "content": {
                                    "application/octet-stream": {
                                        "schema": {"type": "string", "format": "binary"}
                                    },
                                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                                },
                            },
                            "400": _error("Not a UUID."),
                            "404": _error("Unknown, not yours, or not completed."),
                        }
                    ),
                }
            },
            "/batch-results/{batchId}.zip": {
                "get": {
                    "operationId": "getBatchResultsZip",
                    "summary": "Download the processed files of every completed item as one "
                    "ZIP, streamed.",
                    "parameters": [_BATCH_ID],
                    "responses": _with_session(
                        {
                            "200": {
                                "description": "The ZIP: each result named after its uploaded "
                                "file with the result's extension (`photo (2).jpg` for a "
                                "second `photo.jpg`).",
                                "headers": {
                                    "Content-Disposition": {
                                        "description": "`attachment`.",
                                        "required": True,
                                        "schema": {"type": "string"},
                                    },
                                    "Cache-Control": {
                                        "required": True,
                                        "schema": {"const": "no-store"},
                                    },
                                },
                                "content": {
                                    "application/zip": {
                                        "schema": {"type": "string", "format": "binary"}
                                    }
                                },
                            },
                            "400": _error("Not a UUID."),
                            "404": _error(
                                "Unknown, expired or not yours; or no result file is left."
                            ),
                            "409": _error("`nothing_completed`: no item has completed (yet)."),
                        }
                    ),
                }
            },
            "/batch-cancel/{batchId}": {
                "post": {
                    "operationId": "cancelBatch",
                    "summary": "Cancel the batch: every item not yet started becomes "
                    "`cancelled`; running items finish as they will.",
                    "parameters": [_BATCH_ID],
                    "responses": _with_session(
                        {
                            "200": _json(
                                "How many items were cancelled (0 if finished).", "Cancelled"
                            ),
                            "400": _error("Not a UUID."),
                            "404": _error("Unknown, expired or not yours."),
                        }
                    ),
                }
            },
            "/batch-retry/{batchId}": {
                "post": {
                    "operationId": "retryBatch",
                    "summary": "Retry failed and cancelled items (those named, or every "
                    "one) and resume the batch.",
                    "parameters": [_BATCH_ID],
                    "requestBody": {
                        "required": False,
                        "description": "No body (or an empty one): every failed and "
                        "cancelled item.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["itemIds"],
                                    "properties": {
                                        "itemIds": {
                                            "type": "array",
                                            "items": _UUID,
                                            "minItems": 1,
                                            "maxItems": min(MAX_RETRY_IDS, max_ids),
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": _with_session(
                        {
                            "202": _json(
                                "Retried; the batch runs again.",
                                "Retried",
                                _STATUS_URL,
                                # Not to itself: right after a retry, nothing has failed.
                                {k: v for k, v in _BATCH_LINKS.items() if k != "retryBatch"},
                            ),
                            "400": _error("Not a UUID, bad JSON, or bad or too many item ids."),
                            "404": _error(
                                "Batch unknown, expired or not yours; or an unknown item."
                            ),
                            "408": timeout,
                            "409": _error(
                                "`nothing_to_retry`: a named item has neither failed nor been "
                                "cancelled, or no item has."
                            ),
                            "410": _error(
                                "`inputs_gone`: the uploaded files behind an item have expired; "
                                "nothing was retried."
                            ),
                            "413": _error("The body is too large."),
                            "415": _error("A body that is not JSON."),
                            "503": _error("The service is shutting down."),
                        }
                    ),
                }
            },
            "/batch-pause/{batchId}": {
                "post": {
                    "operationId": "pauseBatch",
                    "summary": "Pause the batch: items not yet started stay pending (the "
                    "status reads `paused`); running items finish as they will.",
                    "parameters": [_BATCH_ID],
                    "responses": _with_session(
                        {
                            "200": _json(
                                "Whether this call paused it (false: finished or paused already).",
                                "Paused",
                            ),
                            "400": _error("Not a UUID."),
                            "404": _error("Unknown, expired or not yours."),
                        }
                    ),
                }
            },
            "/batch-unpause/{batchId}": {
                "post": {
                    "operationId": "unpauseBatch",
                    "summary": "Unpause the batch: its pending items run again.",
                    "parameters": [_BATCH_ID],
                    "responses": _with_session(
                        {
                            "200": _json(
                                "Whether this call unpaused it (false: it was not paused).",
                                "Unpaused",
                            ),
                            "400": _error("Not a UUID."),
                            "404": _error("Unknown, expired or not yours."),
                            "503": _error("The service is shutting down."),
                        }
                    ),
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenapi",
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "Uploaded": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["id", "filename", "size"],
                                "properties": {
                                    "id": _UUID,
                                    "filename": {"type": "string"},
                                    "size": count,
                                },
                            },
                        }
                    },
                },
                "Started": {
                    "type": "object",
                    "required": ["batchId", "status", "statusUrl"],
                    "properties": {
                        "batchId": _UUID,
                        "status": {"enum": ["pending", "processing", "completed", "failed"]},
                        "statusUrl": {"type": "string"},
                    },
                },
                "Cancelled": {
                    "type": "object",
                    "required": ["cancelled"],
                    "properties": {"cancelled": count},
                    "additionalProperties": False,
                },
                "Paused": {
                    "type": "object",
                    "required": ["paused"],
                    "properties": {"paused": {"type": "boolean"}},
                    "additionalProperties": False,
                },
                "Unpaused": {
                    "type": "object",
                    "required": ["unpaused"],
                    "properties": {"unpaused": {"type": "boolean"}},
                    "additionalProperties": False,
                },
                "Retried": {
                    "type": "object",
                    "required": ["retried", "batchId", "statusUrl"],
                    "properties": {
                        "retried": {"type": "integer", "minimum": 1},
                        "batchId": _UUID,
                        "statusUrl": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
                "BatchStatus": {
                    "type": "object",
                    "required": [
                        "batchId",
                        "status",
                        "progress",
                        "images",
                        "estimatedTimeRemaining",
                        "estimatedTimeRemainingRange",
                        "createdAt",
                        "updatedAt",
                        "finishedAt",
                    ],
                    "properties": {
                        "batchId": _UUID,
                        "status": {
                            "enum": [
                                "pending",
                                "processing",
                                "completed",
                                "failed",
                                "cancelled",
                                "paused",
                            ]
                        },
                        "progress": {
                            "type": "object",
                            "required": [
                                "total",
                                "completed",
                                "failed",
                                "processing",
                                "pending",
                                "cancelled",
                            ],
                            "properties": {
                                "total": count,
                                "completed": count,
                                "failed": count,
                                "processing": count,
                                "pending": count,
                                "cancelled": count,
                            },
                            "additionalProperties": False,
                        },
                        "images": {"type": "array", "items": item},
                        "estimatedTimeRemaining": {"type": ["integer", "null"], "minimum": 0},
                        "estimatedTimeRemainingRange": {
                            "type": ["array", "null"],
                            "items": {"type": "integer", "minimum": 0},
                            "minItems": 2,
                            "maxItems": 2,
                        },
                        "etaUnavailable": {
                            "description": "Why `estimatedTimeRemaining` is null while the "
                            "batch is not finished: the batch is paused (`paused`), nothing "
                            "has finished yet (`starting`), or every item left waits for its "
                            "lost worker's lease to be reclaimed (`waiting_for_lost_items`). "
                            "Absent otherwise.",
                            "enum": ["paused", "starting", "waiting_for_lost_items"],
                        },
                        "createdAt": timestamp,
                        "updatedAt": timestamp,
                        "finishedAt": {"type": ["string", "null"], "format": "date-time"},
                        "version": {
                            "description": "The batch version; only in bodies of chosen "
                            "items (query parameters, events with `delta=1`).",
                            "type": "integer",
                            "minimum": 0,
                        },
                        "nextAfter": {
                            "description": "With `limit`: the `after` of the next page, "
                            "null on the last.",
                            "oneOf": [_UUID, {"type": "null"}],
                        },
                        "metadata": {
                            "$ref": "#/components/schemas/Metadata",
                            "description": "The metadata given at the start; absent when none.",
                        },
                    },
                    "additionalProperties": False,
                },
                "Metadata": _METADATA,
            }
        },
    }
    schemas = doc["components"]["schemas"]
    summary = {
        **schemas["BatchStatus"],
        "required": [r for r in schemas["BatchStatus"]["required"] if r != "images"],
        "properties": {
            k: v for k, v in schemas["BatchStatus"]["properties"].items() if k != "images"
        },
    }
    schemas["BatchList"] = {
        "type": "object",
        "required": ["batches", "nextAfter"],
        "properties": {
            "batches": {"type": "array", "items": summary},
            "nextAfter": {
                "description": "The `after` of the next page; null on the last.",
                "oneOf": [_UUID, {"type": "null"}],
            },
        },
        "additionalProperties": False,
    }
    # Every operation that changes state refuses another site's page (cookie sessions).
    for operations in doc["paths"].values():
        if "post" in operations:
            responses = {**operations["post"]["responses"], "403": _CROSS_ORIGIN}
            operations["post"]["responses"] = dict(sorted(responses.items()))
    return doc
