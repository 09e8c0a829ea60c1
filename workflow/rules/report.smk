rule aggregate:
    input:
        unpack(aggregate_inputs),
    output:
        csv=report("results/{dataset}/tables/main_results.csv", caption="../report/main_results.rst", category="Tables"),
        md="results/{dataset}/tables/main_results.md",
    log:
        "logs/{dataset}/aggregate.log",
    benchmark:
        "results/{dataset}/benchmarks/aggregate.tsv"
    priority: 10  # with the longest analysis (fairness), the others after it on the other core
    conda:
        "../../envs/report.yaml"
    threads: aggregate_threads
    params:
        evaluate=config["evaluate"],
        ehr_only_models=ehr_only_models(),  # their one miss<r> run is reported at every miss<r>
        grid_missing=grid_missing(),
        itemid_map=config["ehr"]["itemid_map"],
    script:
        "../../scripts/aggregate.py"


# The main tables need every cell. After `snakemake --keep-going` left failed cells, this target tabulates the
# cells that finished and lists the missing ones (task/model/missing/seed) at the top of the Markdown.
rule aggregate_available:
    input:
        unpack(available_aggregate_inputs),
    output:
        csv=f"{RESULTS}/tables/available_results.csv",
        md=f"{RESULTS}/tables/available_results.md",
    log:
        f"logs/{DATASET}/aggregate_available.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate_available.tsv"
    conda:
        "../../envs/report.yaml"
    threads: aggregate_threads
    params:
        evaluate=config["evaluate"],
        runs=grid_runs(),
        ehr_only_models=ehr_only_models(),
        grid_missing=grid_missing(),
        itemid_map=config["ehr"]["itemid_map"],
    script:
        "../../scripts/aggregate_available.py"
