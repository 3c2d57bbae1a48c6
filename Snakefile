# The parallelism study: corpus -> tokenizer -> token shards -> one training run per configured
# strategy -> metrics tables -> figures -> HTML report. Rules only wire; logic lives in src/llmpar.
from snakemake.utils import min_version

min_version("9.0")


# The default study, unless the command line names config files (a preset replaces it, not extends it).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "report/captions/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
