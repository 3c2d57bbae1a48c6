# Run summaries -> tables -> figures -> the HTML report.


rule aggregate:
    input:
        summaries=summaries(),
        steps=run_steps(),
    output:
        metrics=report(
            f"{RES}/metrics.csv",
            caption="../report/captions/metrics.rst",
            category="Tables",
        ),
        steps=f"{RES}/steps.csv",
        evals=f"{RES}/evals.csv",
        samples=f"{RES}/samples.csv",
    log:
        f"{LOGS}/aggregate.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        runs=RUNS,
        baseline=CFG["baseline"],
        reference_batch=CFG["train"]["pollux_reference_batch"],
        runs_dir=lambda wildcards, input: str(Path(input.summaries[0]).parent.parent),
        out=parent("metrics"),
    shell:
        "python {params.script:q} aggregate --runs-dir {params.runs_dir:q} --runs {params.runs:q} "
        "--baseline {params.baseline:q} --reference-batch {params.reference_batch} "
        "--out-dir {params.out:q} > {log:q} 2>&1"


rule figures:
    input:
        metrics=rules.aggregate.output.metrics,
        steps=rules.aggregate.output.steps,
        samples=rules.aggregate.output.samples,
    output:
        [
            report(
                f"{RES}/figures/{name}.png",
                caption=f"../report/captions/{name}.rst",
                category="Figures",
            )
            for name in FIGURE_NAMES
        ],
        expand(f"{RES}/figures/{{name}}.svg", name=FIGURE_NAMES),
    log:
        f"{LOGS}/figures.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        names=FIGURE_NAMES,
        out=lambda wildcards, output: str(Path(output[0]).parent),
    shell:
        "python {params.script:q} figures --metrics {input.metrics:q} --steps {input.steps:q} "
        "--samples {input.samples:q} --out-dir {params.out:q} --names {params.names:q} > {log:q} 2>&1"


rule plan:
    input:
        summaries=summaries(),
        model=PLAN_MODEL,
    output:
        plan=report(
            f"{RES}/plan.csv",
            caption="../report/captions/plan.rst",
            category="Tables",
        ),
        extrapolation=report(
            f"{RES}/extrapolation.csv",
            caption="../report/captions/extrapolation.rst",
            category="Tables",
        ),
    log:
        f"{LOGS}/plan.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        config=as_json(CFG),
        runs_dir=lambda wildcards, input: str(Path(input.summaries[0]).parent.parent),
    shell:
        "python {params.script:q} plan --config {params.config:q} --runs-dir {params.runs_dir:q} "
        "--plan {output.plan:q} --extrapolation {output.extrapolation:q} > {log:q} 2>&1"


if sweep_outputs():

    rule batch_sweep:
        input:
            summaries=summaries(),
        output:
            table=sweep_outputs()["sweep_table"],
            fit=sweep_outputs()["sweep_fit"],
            png=sweep_outputs()["sweep_figure"],
            svg=sweep_outputs()["sweep_figure_svg"],
        log:
            f"{LOGS}/batch_sweep.log",
        conda:
            ENV
        params:
            script=STUDY_PY,
            config=as_json(CFG),
            runs_dir=lambda wildcards, input: str(
                Path(input.summaries[0]).parent.parent
            ),
            figures=parent("png"),
        shell:
            "python {params.script:q} batch-sweep --config {params.config:q} --runs-dir {params.runs_dir:q} "
            "--table {output.table:q} --fit {output.fit:q} --figure-dir {params.figures:q} > {log:q} 2>&1"


rule plan_figure:
    input:
        plan=rules.plan.output.plan,
    output:
        png=report(
            f"{RES}/figures/plan_vs_measured.png",
            caption="../report/captions/plan_vs_measured.rst",
            category="Figures",
        ),
        svg=f"{RES}/figures/plan_vs_measured.svg",
    log:
        f"{LOGS}/plan_figure.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        out=parent("png"),
    shell:
        "python {params.script:q} plan-figure --plan {input.plan:q} --out-dir {params.out:q} > {log:q} 2>&1"


rule html_report:
    input:
        unpack(lambda wildcards: plan_outputs()),
        metrics=rules.aggregate.output.metrics,
        figures=figures(),
        summaries=summaries(),
    output:
        html=f"report/{STUDY}/report.html",
    log:
        f"{LOGS}/report.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        config=as_json(CFG),
        names=FIGURE_NAMES,
        figures=lambda wildcards, input: str(Path(input.figures[0]).parent),
        captions=CAPTIONS,
        plan=plan_args,
    shell:
        "python {params.script:q} report --config {params.config:q} --metrics {input.metrics:q} "
        "--figures-dir {params.figures:q} --captions-dir {params.captions:q} "
        "--summaries {input.summaries:q} --names {params.names:q} {params.plan} --out {output.html:q} "
        "> {log:q} 2>&1"
