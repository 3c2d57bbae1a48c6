# Corpus -> tokenizer -> packed token shards. Only data settings reach these rules' params, so a
# change of training settings never rebuilds data; the tokenize rule also gets one sequence's length
# (model.seq_len + 1) to refuse a split that cannot fill it, so a change of seq_len reruns only it.
# The debian source first fetches its packages (debian_fetch, on the submitting host: compute nodes
# often have no network) and turns them into text (debian_text).


localrules:
    debian_fetch,


rule debian_fetch:
    output:
        manifest=f"{DEBIAN}/manifest.json",
    log:
        f"{LOGS}/debian_fetch.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        debian=debian_fetch_settings(),
        out=parent("manifest"),
    shell:
        "python {params.script:q} debian-fetch --debian {params.debian:q} "
        "--out {params.out:q} > {log:q} 2>&1"


rule debian_text:
    input:
        manifest=rules.debian_fetch.output.manifest,
    output:
        meta=f"{DEBIAN}/text/meta.json",
        texts=debian_texts(),
    log:
        f"{LOGS}/debian_text.log",
    conda:
        ENV
    params:
        script=STUDY_PY,
        debian=as_json(CFG["data"]["debian"]),
        fetch=lambda wildcards, input: str(Path(input.manifest).parent),
        out=parent("meta"),
    shell:
        "python {params.script:q} debian-text --debian {params.debian:q} "
        "--fetch-dir {params.fetch:q} --out {params.out:q} > {log:q} 2>&1"


rule corpus:
    input:
        unpack(corpus_input),
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
        text_dir=text_dir_arg,
    shell:
        "python {params.script:q} corpus --data {params.data:q} --seed {params.seed} "
        "--out {params.out:q} {params.text_dir} > {log:q} 2>&1"


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
        min_tokens=CFG["model"]["seq_len"] + 1,
    shell:
        "python {params.script:q} tokenize --tokenizer-json {input.tokenizer:q} "
        "--corpus-dir {params.corpus:q} --out {params.out:q} "
        "--min-tokens {params.min_tokens} > {log:q} 2>&1"
