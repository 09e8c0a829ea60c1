# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
CORES ?= all

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade-strategy only-if-needed -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

demo: install  ## synthetic data -> cohort -> tensors -> every grid cell -> tables, analyses, report
	$(VENV)/bin/snakemake --cores $(CORES)
	$(VENV)/bin/snakemake --report results/synthetic/report.html
	@echo; cat results/synthetic/tables/main_results.md
	@echo; echo "Report (every table and figure): results/synthetic/report.html"

test: install  ## unit tests + a tiny end-to-end workflow run
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

lint: install
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results logs .snakemake
