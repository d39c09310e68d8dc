#!/usr/bin/env bash
# The main command: sets up .venv on first use; for each embedded model (OPT, then its Flan-T5
# sibling) exports it, starts the real tritonserver, captions the bundled sample images and answers
# a question about each over gRPC, then stops the server; then the retrieval sibling: indexes the
# samples into a throwaway Qdrant collection, finds each by its caption, matches a right and a wrong caption.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/venv.sh")"
cd "$root"
exec "$venv/bin/blip2-triton" demo "$@"
