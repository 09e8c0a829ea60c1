rule aggregate:
    input:
        unpack(aggregate_inputs),
    output:
        csv=report("results/{dataset}/tables/main_results.csv", caption="../report/main_results.rst", category="Tables"),
        md="results/{dataset}/tables/main_results.md",
    params:
        evaluate=config["evaluate"],
    log:
        "logs/{dataset}/aggregate.log",
    benchmark:
        "benchmarks/{dataset}/aggregate.tsv"
    conda:
        "../../envs/report.yaml"
    script:
        "../../scripts/aggregate.py"
