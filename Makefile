# The two commands of the README: `make run` and `make test`.
.PHONY: setup run test lint demo-model bench viewer

setup:
	./scripts/setup.sh

run: setup
	./scripts/run.sh

test: setup
	.venv/bin/python -m pytest

# The second mypy run is strict on pipeline and storage only: the modules they import (inference,
# export, core) are checked by the first, plain run (--follow-imports=silent keeps them out of it).
lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy \
		&& .venv/bin/mypy --strict --follow-imports=silent -p nnunet_node.pipeline -p nnunet_node.storage

demo-model: setup
	.venv/bin/python scripts/make_demo_models.py

viewer:
	./scripts/fetch_viewer.sh
