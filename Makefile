# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the pair that installs and imports together on the reference machine.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Idle OpenMP threads sleep instead of spinning: on a small shared CPU, spinning threads of one
# process starve the others (a 30x slowdown measured here with two busy processes on 2 cores).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo demo-unclip demo-finetune test install clean

# uv (from PyPI, into the venv) fetches and unpacks torch's ~4 GB of CUDA wheels in parallel where
# pip goes one file at a time (docs/performance.md, "make demo"); pip does the install when uv
# cannot be had or fails.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	( $(BIN)/pip install -q uv && $(BIN)/uv pip install -q --python $(BIN)/python $(TORCH_PINS) -e ".[dev]" ) \
		|| ( $(BIN)/pip install -q $(TORCH_PINS) && $(BIN)/pip install -q $(TORCH_PINS) -e ".[dev]" )
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

# unCLIP (prior + image-embedding decoder) on top of `make demo`'s VAE, CLIP and text-to-image runs.
demo-unclip: $(STAMP)
	$(BIN)/python tools/demo_unclip.py

# LoRA fine-tune of `make demo`'s text-to-image model, exported as a diffusers pipeline, on a new
# concept ("a handwritten digit seven, upside down"); judged before and after (tools/demo_finetune.py).
demo-finetune: $(STAMP)
	$(BIN)/python tools/demo_finetune.py

# pytest-xdist: one worker per core (at most 4). loadgroup hands out single tests, so the load
# evens out; the multi-rank tests (xdist_group "multirank") go first, to one worker, one at a time
# (several process groups at once on two cores would starve each other). TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto
test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadgroup

clean:
	rm -rf runs/demo
