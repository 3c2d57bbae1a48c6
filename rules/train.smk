# One training job per configured run, launched by scripts/train.py (torchrun; srun across nodes).


if not CFG["recorded"]:

    rule train:
        input:
            tokens=rules.tokenize.output.meta,
        output:
            summary=f"{RES}/runs/{{run}}/summary.json",
            steps=f"{RES}/runs/{{run}}/steps.jsonl",
        log:
            f"{LOGS}/train/{{run}}.log",
        wildcard_constraints:
            run=one_of(RUNS),
        conda:
            ENV
        threads:
            lambda wc: min(
                workflow.cores,
                CFG["runs"][wc.run]["gpus_per_node"] * CFG["runs"][wc.run]["nodes"],
            )
        resources:
            **train_resources(),
        params:
            script=TRAIN_PY,
            run=run_json,
            tokens=lambda wildcards, input: str(Path(input.tokens).parent),
            out=parent("summary"),
        shell:
            "python {params.script:q} --run-config {params.run:q} --tokens {params.tokens:q} "
            "--out {params.out:q} --record-invalid > {log:q} 2>&1"

    # A point of a sweep that its layout cannot train: its record (status invalid, the reason), no training.
    rule refuse:
        output:
            summary=f"{RES}/runs/{{run}}/summary.json",
            steps=f"{RES}/runs/{{run}}/steps.jsonl",
        log:
            f"{LOGS}/train/{{run}}.log",
        wildcard_constraints:
            run=one_of(REFUSED),
        localrule: True
        conda:
            ENV
        params:
            script=STUDY_PY,
            record=lambda wildcards: as_json(CFG["refused"][wildcards.run]),
            out=parent("summary"),
        shell:
            "python {params.script:q} refuse --record {params.record:q} --out {params.out:q} > {log:q} 2>&1"
