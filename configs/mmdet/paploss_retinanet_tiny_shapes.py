# A tiny RetinaNet (ResNet-18 at 1/4 width, 128-pixel images) on paploss's bundled
# `shapes` dataset, trained with the Parameterized AP Loss: small enough that a
# training step takes well under a second on a CPU.
#
#     paploss data make shapes data/shapes          # or paploss.data.make_dataset("shapes", "data/shapes")
#     python tools/train.py configs/mmdet/paploss_retinanet_tiny_shapes.py \
#         --cfg-options model.bbox_head.spec=runs/my-search/loss_spec.json
#
# The head, assigner, test settings and the runtime it shares with the R-50 COCO
# config come from the local base ./_base_/paploss_retinanet.py (MMDetection's own
# `_base_ = 'mmdet::...'` bases are not used: they need pkg_resources, which current
# setuptools no longer ships).
#
# The default spec is the identity function in all five places (the search's start).
_base_ = ['./_base_/paploss_retinanet.py']

data_root = 'data/shapes/'
classes = ('ellipse', 'rectangle', 'triangle', 'diamond', 'cross')
image_size = 128
identity = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0]

# The model: the base's RetinaNet with PAPLossRetinaHead, at tiny sizes.
model = dict(
    backbone=dict(
        depth=18,
        base_channels=16,
        frozen_stages=-1,
        norm_eval=False),
    neck=dict(
        in_channels=[16, 32, 64, 128],
        out_channels=32,
        start_level=0,
        add_extra_convs=False,
        num_outs=4),
    bbox_head=dict(
        num_classes=len(classes),
        in_channels=32,
        stacked_convs=2,
        feat_channels=32,
        anchor_generator=dict(strides=[4, 8, 16, 32]),
        spec=dict(points=[identity] * 5, grad_scale=1.0)))

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
