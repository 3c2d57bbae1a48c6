# Run summaries -> tables -> figures -> the HTML report.

# The studies the report's scaling section joins (compare_with: study -> its runs directory) and the
# report's template.
COMPARED = {name: f"results/{name}/runs" for name in CFG["compare_with"]}
TEMPLATE = str(BASE / "report" / "templates" / "report.html.j2")


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
        runs=RUNS + REFUSED,
        baseline=CFG["baseline"],
        reference_batch=CFG["train"]["pollux_reference_batch"],
        runs_dir=lambda wildcards, input: str(Path(input.summaries[0]).parent.parent),
        out=parent("metrics"),
    shell:
        "python {params.script:q} aggregate --runs-dir {params.runs_dir:q} --runs {params.runs:q} "
        "--baseline {params.baseline:q} --reference-batch {params.reference_batch} "
        "--out-dir {params.out:q} > {log:q} 2>&1"


rule derive:
    input:
        summaries=summaries(),
        steps=rules.aggregate.output.steps,
        metrics=rules.aggregate.output.metrics,
        compared=sorted(
            str(p) for d in COMPARED.values() for p in Path(d).glob("*/summary.json")
        ),
        baselines=sorted(str(p) for p in Path(RES, "baselines").glob("*.json")),
    output:
        runs=f"{RES}/runs.csv",
        scaling=f"{RES}/scaling.csv",
        peers=f"{RES}/peers.csv",
    log:
        f"{LOGS}/derive.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        study=STUDY,
        compare=as_json(COMPARED),
        baselines=f"{RES}/baselines",
        out=parent("runs"),
    shell:
        "python {params.script:q} derive --study {params.study:q} --summaries {input.summaries:q} "
        "--steps {input.steps:q} --metrics {input.metrics:q} --compare {params.compare:q} "
        "--baselines-dir {params.baselines:q} --out-dir {params.out:q} > {log:q} 2>&1"


rule figures:
    input:
        metrics=rules.aggregate.output.metrics,
        steps=rules.aggregate.output.steps,
        samples=rules.aggregate.output.samples,
        runs=rules.derive.output.runs,
        scaling=rules.derive.output.scaling,
    output:
        [
            report(
                f"{RES}/figures/{name}.png",
                caption=f"../report/captions/{caption_file(name)}",
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
        "--samples {input.samples:q} --runs {input.runs:q} --scaling {input.scaling:q} "
        "--out-dir {params.out:q} --names {params.names:q} > {log:q} 2>&1"


rule plan:
    input:
        summaries=summaries(),
        model=PLAN_MODEL,
        sweep=sweep_from_inputs(),
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
        extrapolation=rules.plan.output.extrapolation,
    output:
        png=report(
            f"{RES}/figures/plan_vs_measured.png",
            caption="../report/captions/plan_vs_measured.rst",
            category="Figures",
        ),
        svg=f"{RES}/figures/plan_vs_measured.svg",
        extrapolation=report(
            f"{RES}/figures/extrapolation.png",
            caption=f"../report/captions/{caption_file('extrapolation')}",
            category="Figures",
        ),
        extrapolation_svg=f"{RES}/figures/extrapolation.svg",
    log:
        f"{LOGS}/plan_figure.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        out=parent("png"),
    shell:
        "python {params.script:q} plan-figure --plan {input.plan:q} --extrapolation {input.extrapolation:q} "
        "--out-dir {params.out:q} > {log:q} 2>&1"


rule html_report:
    input:
        unpack(lambda wildcards: plan_outputs()),
        unpack(lambda wildcards: sweep_outputs()),
        metrics=rules.aggregate.output.metrics,
        runs=rules.derive.output.runs,
        scaling=rules.derive.output.scaling,
        peers=rules.derive.output.peers,
        figures=figures(),
        summaries=summaries(),
        template=TEMPLATE,
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
        data=f"{RES}/data",
    shell:
        "python {params.script:q} report --config {params.config:q} --metrics {input.metrics:q} "
        "--data-dir {params.data:q} "
        "--runs {input.runs:q} --scaling {input.scaling:q} --peers {input.peers:q} "
        "--figures-dir {params.figures:q} --captions-dir {params.captions:q} --template {input.template:q} "
        "--summaries {input.summaries:q} --names {params.names:q} {params.plan} --out {output.html:q} "
        "> {log:q} 2>&1"
