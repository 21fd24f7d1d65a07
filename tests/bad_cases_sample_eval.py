"""Bad-input cases of sample.py and eval.py for tests/test_bad_inputs.py (the layout of its
CASES: (case, entry point, overrides, the message it must give)). Cases that need files of
their own (npz layouts, image folders, an unconditional checkpoint for eval.py, a read-only
disk) are in tests/test_eval.py; resume scenarios in tests/test_sample_resume.py."""

SAMPLE_EVAL_CASES: list[tuple[str, str, list[str], str]] = [
    (
        "sample: blank text",
        "sample",
        ["text='   '"],
        r"^text='   ' holds no letters; give a sentence \(text='HELLO WORLD'\) or drop text=",
    ),
    (
        "sample: negative number of images",
        "sample",
        ["n=-5"],
        r"^n and batch_size must be >= 1, got n=-5, batch_size=64: n is the number of images",
    ),
    (
        "sample: out= an existing file",
        "sample",
        ["out={tmp}/samples.txt"],
        r"^out=.*samples.txt is a file; give a path in a directory: out=DIR",
    ),
    (
        "sample: out= under a file",
        "sample",
        ["out={tmp}/samples.txt/run"],
        r"^out=.*samples.txt/run lies under the file .*samples.txt; give a path in a directory: "
        r"out=DIR",
    ),
    (
        "sample: guidance without labels",
        "sample",
        ["labels=null", "guidance=2"],
        r"^guidance=2 needs labels to guide towards, and labels=null draws unconditional "
        r"samples; give labels=cycle \(or a list, or class_name=NAME\), or drop guidance=",
    ),
    (
        "sample: resume with another seed",
        "sample_again",
        ["resume=true", "seed=1"],
        r"^.*samples holds samples drawn with other settings \(seed 0 there, 1 now\): "
        r"resume=true continues only with the same settings; .*another out=DIR.*overwrite=true",
    ),
    (
        "sample: resume with another sampler",
        "sample_again",
        ["resume=true", "sampler=ddim"],
        r"drawn with other settings \(sampler \"ddpm\" there, \"ddim\" now; .*\): resume=true "
        r"continues only with the same settings; .*overwrite=true",
    ),
    (
        "eval: batch size 0",
        "eval",
        ["batch_size=0"],
        r"^batch_size=0: give the images per forward pass, >= 1 \(e.g. batch_size=100\)",
    ),
    (
        "eval: negative number of images",
        "eval",
        ["n=-5"],
        r"^n=-5: FID needs at least 2 images per set, got -5; give the number of source images "
        r"to measure \(papers: n=50000\)",
    ),
    (
        "eval: misspelt reference split",
        "eval",
        ["reference_split=tset"],
        r"^reference_split='tset': dataset mnist5k has no splits .* use reference_split=train",
    ),
    (
        "eval: misspelt reference split of a dataset with splits",
        "eval",
        ["dataset=mnist", "reference_split=tset"],
        r"^reference_split='tset' is not a split of mnist; choose one of \['train', 'test'\]",
    ),
    (
        "eval: out= a directory",
        "eval",
        ["out={tmp}"],
        r"^out=.* is a directory; give the JSON's file name, e.g. out=.*fid.json",
    ),
    (
        "eval: out= under a file",
        "eval",
        ["out={tmp}/samples.txt/result.json"],
        r"^out=.*samples.txt/result.json lies under the file .*samples.txt; give a path in a "
        r"directory: out=DIR/fid.json",
    ),
    (
        "sample: unknown device",
        "sample",
        ["device=tpu"],
        r"^device=tpu is not a device: use device=auto, cpu, cuda or cuda:N",
    ),
    (
        "eval: unknown device",
        "eval",
        ["device=tpu"],
        r"^device=tpu is not a device: use device=auto, cpu, cuda or cuda:N",
    ),
    (
        "sample: negative animation hold",
        "sample",
        ["animate=true", "animation_hold_ms=-1"],
        r"^animation_hold_ms must be an integer >= 0 \(milliseconds\), got -1",
    ),
    (
        "eval: sampler steps for a source of images",
        "eval",
        ["source={tmp}", "steps=50"],
        r"^steps=50 applies to checkpoint sources \(.ckpt\), which eval.py samples from; "
        r"source=.* holds images: drop it",
    ),
]
