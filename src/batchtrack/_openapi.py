"""The OpenAPI 3.1 document of the HTTP API, kept by hand next to the handler."""

from __future__ import annotations

from typing import Any

from . import __version__
from ._control import MAX_RETRY_IDS

_UUID = {"type": "string", "format": "uuid"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, ref: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }
    if headers:
        response["headers"] = headers
    return response


_BATCH_ID = {"name": "batchId", "in": "path", "required": True, "schema": _UUID}


def document(base: str, max_files: int) -> dict[str, Any]:
    """The document, with ``base`` (mount point + prefix) as the server URL."""
    item = {
        "type": "object",
        "required": ["id", "filename", "status"],
        "properties": {
            "id": {"type": "string"},
            "filename": {"type": "string"},
            "status": {"enum": ["pending", "processing", "completed", "failed"]},
            "error": {"type": "string", "description": "Only on failed items."},
            "attempts": {
                "type": "integer",
                "minimum": 2,
                "description": "How many times the item was started since it was created or "
                "last retried; only when more than once.",
            },
        },
        "additionalProperties": False,
    }
    count = {"type": "integer", "minimum": 0}
    event = {  # one server-sent event (the 3.2 `itemSchema`; 3.1 has no word for streams)
        "description": "One event; a `: keep-alive` comment comes every 15 s between events.",
        "type": "object",
        "required": ["data"],
        "properties": {
            "id": {"type": "string", "description": "The batch version."},
            "event": {"type": "string"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/BatchStatus"},
            },
        },
    }
    timestamp = {"type": "string", "format": "date-time"}
    status_headers = {
        "ETag": {"schema": {"type": "string"}},
        "Cache-Control": {"schema": {"const": "no-store"}},
    }
    return {
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
                                            "maxItems": max_files,
                                        }
                                    },
                                    "required": ["files"],
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": _json("Stored.", "Uploaded"),
                        "400": _error("No files, too many files, or a malformed body."),
                        "413": _error("A file or the body is too large."),
                        "415": _error("Not multipart/form-data."),
                    },
                }
            },
            "/process-batch": {
                "post": {
                    "summary": "Start processing uploaded files as one batch.",
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
                                            "maxItems": max_files,
                                            "uniqueItems": True,
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _json(
                            "Started.", "Started", {"Location": {"schema": {"type": "string"}}}
                        ),
                        "400": _error("Bad JSON or bad, duplicate or too many file ids."),
                        "404": _error("A file id is unknown, expired or not yours."),
                        "413": _error("The body is too large."),
                        "415": _error("Not JSON."),
                        "503": _error("The service is shutting down."),
                    },
                }
            },
            "/batch-status/{batchId}": {
                "get": {
                    "summary": "The batch's status, progress, items and ETA.",
                    "parameters": [
                        _BATCH_ID,
                        {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json("The status.", "BatchStatus", status_headers),
                        "304": {"description": "Unchanged since the ETag given."},
                        "400": _error("Not a UUID."),
                        "404": _error("Unknown, expired or not yours."),
                    },
                }
            },
            "/batch-events/{batchId}": {
                "get": {
                    "summary": "Server-sent events: the status body at every change.",
                    "parameters": [_BATCH_ID],
                    "responses": {
                        "200": {
                            "description": "One `data:` event per change; closes when finished.",
                            "content": {"text/event-stream": {"schema": event}},
                        },
                        "400": _error("Not a UUID."),
                        "404": _error("Unknown, expired or not yours."),
                    },
                }
            },
            "/batch-results/{batchId}/{itemId}": {
                "get": {
                    "summary": "Download the processed file of a completed item.",
                    "parameters": [
                        _BATCH_ID,
                        {"name": "itemId", "in": "path", "required": True, "schema": _UUID},
                    ],
                    "responses": {
                        "200": {
                            "description": "The file.",
                            "content": {
                                "application/octet-stream": {
                                    "schema": {"type": "string", "format": "binary"}
                                },
                                "image/*": {"schema": {"type": "string", "format": "binary"}},
                            },
                        },
                        "400": _error("Not a UUID."),
                        "404": _error("Unknown, not yours, or not completed."),
                    },
                }
            },
            "/batch-cancel/{batchId}": {
                "post": {
                    "summary": "Cancel the batch: every item not yet started fails "
                    'with the error "cancelled"; running items finish as they will.',
                    "parameters": [_BATCH_ID],
                    "responses": {
                        "200": _json("How many items were cancelled (0 if finished).", "Cancelled"),
                        "400": _error("Not a UUID."),
                        "404": _error("Unknown, expired or not yours."),
                    },
                }
            },
            "/batch-retry/{batchId}": {
                "post": {
                    "summary": "Retry failed items (those named, or every failed one) and "
                    "resume the batch.",
                    "parameters": [_BATCH_ID],
                    "requestBody": {
                        "required": False,
                        "description": "No body (or an empty one): every failed item.",
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
                                            "maxItems": MAX_RETRY_IDS,
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _json(
                            "Retried; the batch runs again.",
                            "Retried",
                            {"Location": {"schema": {"type": "string"}}},
                        ),
                        "400": _error("Not a UUID, bad JSON, or bad or too many item ids."),
                        "404": _error("Batch unknown, expired or not yours; or an unknown item."),
                        "409": _error(
                            "`nothing_to_retry`: a named item has not failed, or none has."
                        ),
                        "410": _error(
                            "`inputs_gone`: the uploaded files behind an item have expired; "
                            "nothing was retried."
                        ),
                        "413": _error("The body is too large."),
                        "415": _error("A body that is not JSON."),
                        "503": _error("The service is shutting down."),
                    },
                }
            },
            "/openapi.json": {
                "get": {
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
                        "createdAt",
                        "updatedAt",
                        "finishedAt",
                    ],
                    "properties": {
                        "batchId": _UUID,
                        "status": {"enum": ["pending", "processing", "completed", "failed"]},
                        "progress": {
                            "type": "object",
                            "required": ["total", "completed", "failed", "processing", "pending"],
                            "properties": {
                                "total": count,
                                "completed": count,
                                "failed": count,
                                "processing": count,
                                "pending": count,
                            },
                            "additionalProperties": False,
                        },
                        "images": {"type": "array", "items": item},
                        "estimatedTimeRemaining": {"type": ["integer", "null"], "minimum": 0},
                        "createdAt": timestamp,
                        "updatedAt": timestamp,
                        "finishedAt": {"type": ["string", "null"], "format": "date-time"},
                    },
                    "additionalProperties": False,
                },
            }
        },
    }
