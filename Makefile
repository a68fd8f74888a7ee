.PHONY: install test demo flops

install:
	bash scripts/install.sh

test: install
	python3 -m pytest -q -n auto --maxprocesses 4 tests

demo: install
	msa demo

flops:
	python3 -m msa.cli flops
