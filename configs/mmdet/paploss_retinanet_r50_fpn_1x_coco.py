# RetinaNet R-50 FPN, 1x schedule on COCO, trained with the searched Parameterized AP Loss.
#
# The same model as MMDetection's retinanet_r50_fpn_1x_coco.py; only the head changes:
# PAPLossRetinaHead computes one loss, pap_loss over the whole batch (paploss SPEC §1),
# instead of Focal Loss + L1. Train with MMDetection's tools/train.py:
#
#     python tools/train.py configs/mmdet/paploss_retinanet_r50_fpn_1x_coco.py \
#         --cfg-options model.bbox_head.spec=runs/my-search/loss_spec.json
#
# The spec below is the loss the paper's authors searched on COCO for RetinaNet
# (their public release: five functions, order H2, I2, I3, I1, H1, 12 numbers each =
# 6 control points (x, y); gradient scale 4.1231). Replace it with your own search's
# result: a spec JSON path (local or s3://), an MLflow model URI
# ('models:/<name>@champion'), or inline points as here.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']

custom_imports = dict(imports=['paploss.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    # No download at run time: the backbone starts from scratch here. Where the
    # internet (or a local copy) is available, restore ImageNet weights with
    #   --cfg-options model.backbone.init_cfg.type=Pretrained \
    #                 model.backbone.init_cfg.checkpoint=torchvision://resnet50
    backbone=dict(init_cfg=None),
    bbox_head=dict(
        type='PAPLossRetinaHead',
        # The paper's settings for this head: 2 anchor scales per octave and
        # box-delta stds (0.1, 0.1, 0.2, 0.2).
        anchor_generator=dict(scales_per_octave=2),
        bbox_coder=dict(target_stds=[0.1, 0.1, 0.2, 0.2]),
        spec=dict(
            points=[
                [0.0, 0.0, 0.4182, 0.0277, 0.4948, 0.2187, 0.6882, 0.2624, 0.802, 0.6688, 1.0, 1.0],  # H2
                [0.0, 0.0, 0.1279, 0.3696, 0.3056, 0.4708, 0.5198, 0.529, 0.6983, 0.6709, 1.0, 1.0],  # I2
                [0.0, 0.0, 0.0931, 0.0289, 0.3607, 0.5585, 0.4823, 0.7131, 0.6291, 0.8162, 1.0, 1.0],  # I3
                [0.0, 0.0, 0.4914, 0.1499, 0.5492, 0.1664, 0.6259, 0.3051, 0.7945, 0.6195, 1.0, 1.0],  # I1
                [0.0, 0.0, 0.413, 0.0798, 0.4356, 0.3571, 0.5361, 0.7063, 0.8097, 0.9083, 1.0, 1.0],  # H1
            ],
            grad_scale=4.1231,
        ),
        top_k=100000,
        quality='giou',
    ),
)
