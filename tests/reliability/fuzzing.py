"""Settings shared by the fuzz test and the soak runner's schemathesis run."""

from __future__ import annotations

# How the server may refuse schema-invalid data (schemathesis' negative_data_rejection check).
# 413 is added to schemathesis' defaults: a body over --max-body-bytes is refused before it is
# validated (e.g. more ids than maxItems allows, which also makes the body too large).
REJECTION_STATUSES = (400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx")
