# The two commands of the README: `make run` and `make test`.
.PHONY: setup run test lint demo-model bench viewer

setup:
	./scripts/setup.sh

run: setup
	./scripts/run.sh

test: setup
	.venv/bin/python -m pytest

# The second mypy run is strict on pipeline and storage and on every module of ours they import
# (inference, export, core ...). Without PYTHONPATH: mypy takes the interpreter's path entries for
# installed packages and silences their errors, which would hide the imported modules' errors.
lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy \
		&& env -u PYTHONPATH .venv/bin/mypy --strict -p nnunet_node.pipeline -p nnunet_node.storage

demo-model: setup
	.venv/bin/python scripts/make_demo_models.py

viewer:
	./scripts/fetch_viewer.sh
