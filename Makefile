# Two commands: `make run` (the main job on the embedded default) and `make test` (the test suite).
.PHONY: run test
run:
	scripts/run.sh
test:
	scripts/test.sh
