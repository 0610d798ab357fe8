# A tiny Faster R-CNN (ResNet-18 at 1/4 width, 128-pixel images) on paploss's bundled
# `shapes` dataset, both stages trained with the Parameterized AP Loss: small enough
# that a training step takes about a second on a CPU.
#
#     paploss data make shapes data/shapes          # or paploss.data.make_dataset("shapes", "data/shapes")
#     python tools/train.py configs/mmdet/paploss_faster_rcnn_tiny_shapes.py \
#         --cfg-options model.rpn_head.spec=runs/my-search/loss_specs.json \
#                       model.roi_head.bbox_head.spec=runs/my-search/loss_specs.json
#
# The heads (PAPLossRPNHead, PAPLossBBoxHead), assigners, PseudoSamplers (every anchor
# and every proposal is ranked) and the runtime come from ./_base_/paploss_faster_rcnn.py.
# The default spec of each head is the identity function in all five places (the
# search's start).
_base_ = ['./_base_/paploss_faster_rcnn.py']

data_root = 'data/shapes/'
classes = ('ellipse', 'rectangle', 'triangle', 'diamond', 'cross')
image_size = 128
identity = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0]

# The model: the base's Faster R-CNN at tiny sizes, few proposals.
model = dict(
    backbone=dict(
        depth=18,
        base_channels=16,
        frozen_stages=-1,
        norm_eval=False),
    neck=dict(
        in_channels=[16, 32, 64, 128],
        out_channels=32,
        num_outs=4),
    rpn_head=dict(
        in_channels=32,
        feat_channels=32,
        anchor_generator=dict(scales=[4], strides=[4, 8, 16, 32]),
        spec=dict(points=[identity] * 5, grad_scale=1.0)),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            in_channels=32,
            fc_out_channels=128,
            num_classes=len(classes),
            spec=dict(points=[identity] * 5, grad_scale=1.0))),
    train_cfg=dict(rpn_proposal=dict(nms_pre=1000, max_per_img=128)),  # 128 training proposals per image, as paploss.models.faster_rcnn at 128 px
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=128)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/train.json',
        data_prefix=dict(img='images/'),
        filter_cfg=dict(filter_empty_gt=True),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/val.json',
        data_prefix=dict(img='images/'),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/val.json', metric='bbox', format_only=False)
test_evaluator = val_evaluator

# The paper's proxy optimiser (SPEC §4): SGD 0.016, momentum 0.9, weight decay 1e-4,
# linear warm-up from 0.001x (over 500 iterations there; 50 here).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.016, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50)]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=4)  # val_cfg, test_cfg: from the base

# runtime (the hooks and settings both paploss configs use come from the base)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=4))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
log_processor = dict(type='LogProcessor', window_size=10, by_epoch=True)
randomness = dict(seed=0)
