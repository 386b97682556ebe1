"""The names users and scripts rely on (docs/evaluation.md, docs/training.md), written out once
for the tests (deliberately not imported from the implementation, so a renamed metric fails a
test)."""

TRAIN_METRICS = frozenset(
    {
        "loss_G",
        "loss_G_A",
        "loss_G_B",
        "loss_D_A",
        "loss_D_B",
        "loss_cycle_A",
        "loss_cycle_B",
        "loss_idt_A",
        "loss_idt_B",
        "lr",
        "img_per_s",
    }
)
EVAL_METRICS = frozenset(
    {"fid_A2B", "fid_B2A", "kid_A2B", "kid_B2A", "num_images_A2B", "num_images_B2A"}
)
GT_METRICS = frozenset({"psnr_A2B", "ssim_A2B", "psnr_B2A", "ssim_B2A"})
TAGS = ("git_commit", "data_version", "dvc_exp_name")
