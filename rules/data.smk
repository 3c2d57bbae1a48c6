# Corpus -> tokenizer -> packed token shards. Only data settings reach these rules' params, so a
# change of training settings never rebuilds data.


rule corpus:
    output:
        train=f"{RES}/data/corpus/train.txt",
        val=f"{RES}/data/corpus/val.txt",
        meta=f"{RES}/data/corpus/meta.json",
    log:
        f"{LOGS}/corpus.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        data=as_json(CFG["data"]),
        seed=CFG["seed"],
        out=parent("meta"),
    shell:
        "python {params.script:q} corpus --data {params.data:q} --seed {params.seed} "
        "--out {params.out:q} > {log:q} 2>&1"


rule tokenizer:
    input:
        train=rules.corpus.output.train,
    output:
        json=f"{RES}/data/tokenizer/tokenizer.json",
    log:
        f"{LOGS}/tokenizer.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        tokenizer=as_json(CFG["tokenizer"]),
    shell:
        "python {params.script:q} tokenizer --tokenizer {params.tokenizer:q} "
        "--train-txt {input.train:q} --out {output.json:q} > {log:q} 2>&1"


rule tokenize:
    input:
        tokenizer=rules.tokenizer.output.json,
        train=rules.corpus.output.train,
        val=rules.corpus.output.val,
        meta=rules.corpus.output.meta,
    output:
        train=f"{RES}/data/tokens/train.bin",
        val=f"{RES}/data/tokens/val.bin",
        meta=f"{RES}/data/tokens/meta.json",
    log:
        f"{LOGS}/tokenize.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        corpus=lambda wildcards, input: str(Path(input.meta).parent),
        out=parent("meta"),
    shell:
        "python {params.script:q} tokenize --tokenizer-json {input.tokenizer:q} "
        "--corpus-dir {params.corpus:q} --out {params.out:q} > {log:q} 2>&1"
