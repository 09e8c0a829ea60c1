# The report's analyses: each reads every cell's per-stay predictions (val + test, as trained and with one modality
# withheld) and writes its tables (CSV, Markdown, LaTeX) and figures (PNG, SVG). ANALYSES in common.smk lists them.
# analysis_threads (common.smk): cores per analysis job, spread over its slices: 16 CPUs per SLURM job, half of
# --cores on one machine (override per rule with set-threads in a profile). Fairness, the longest, starts first.


rule fusion_gain:
    input:
        unpack(analysis_inputs),
    output:
        analysis_report_files("fusion_gain", "1 When fusion helps"),
    log:
        f"logs/{DATASET}/analysis/fusion_gain.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis/fusion_gain.tsv"
    conda:
        "../../envs/report.yaml"
    threads: analysis_threads
    params:
        analysis=analysis_params,
    script:
        "../../scripts/analysis_fusion_gain.py"


rule modality_imbalance:
    input:
        unpack(analysis_inputs),
    output:
        analysis_report_files("modality_imbalance", "1 When fusion helps"),
    log:
        f"logs/{DATASET}/analysis/modality_imbalance.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis/modality_imbalance.tsv"
    conda:
        "../../envs/report.yaml"
    threads: analysis_threads
    params:
        analysis=analysis_params,
    script:
        "../../scripts/analysis_modality_imbalance.py"


rule ranking:
    input:
        unpack(analysis_inputs),
    output:
        analysis_report_files("ranking", "2 How strategies compare"),
    log:
        f"logs/{DATASET}/analysis/ranking.log",
    conda:
        "../../envs/report.yaml"
    params:
        analysis=analysis_params,
    script:
        "../../scripts/analysis_ranking.py"


rule robustness:
    input:
        unpack(analysis_inputs),
    output:
        analysis_report_files("robustness", "3 Robustness to a missing X-ray"),
    log:
        f"logs/{DATASET}/analysis/robustness.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis/robustness.tsv"
    conda:
        "../../envs/report.yaml"
    threads: analysis_threads
    params:
        analysis=analysis_params,
    script:
        "../../scripts/analysis_robustness.py"


rule fairness:
    input:
        unpack(analysis_inputs),
    output:
        analysis_report_files("fairness", "4 Fairness"),
    log:
        f"logs/{DATASET}/analysis/fairness.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis/fairness.tsv"
    priority: 10
    conda:
        "../../envs/report.yaml"
    threads: analysis_threads
    params:
        analysis=analysis_params,
    script:
        "../../scripts/analysis_fairness.py"


rule calibration:
    input:
        unpack(analysis_inputs),
    output:
        analysis_report_files("calibration", "5 Calibration and X-ray age"),
    log:
        f"logs/{DATASET}/analysis/calibration.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis/calibration.tsv"
    conda:
        "../../envs/report.yaml"
    threads: analysis_threads
    params:
        analysis=analysis_params,
    script:
        "../../scripts/analysis_calibration.py"


rule xray_age:
    input:
        unpack(analysis_inputs),
    output:
        analysis_report_files("xray_age", "5 Calibration and X-ray age"),
    log:
        f"logs/{DATASET}/analysis/xray_age.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis/xray_age.tsv"
    conda:
        "../../envs/report.yaml"
    threads: analysis_threads
    params:
        analysis=analysis_params,
    script:
        "../../scripts/analysis_xray_age.py"
