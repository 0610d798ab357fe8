# RetinaNet R-50 FPN, 1x schedule on COCO, trained with the searched Parameterized AP Loss.
#
# The same model, data pipeline and schedule as MMDetection 3.3's
# configs/retinanet/retinanet_r50_fpn_1x_coco.py. MMDetection's own bases
# (`_base_ = 'mmdet::...'`) need pkg_resources, which current setuptools no longer
# ships, so this file states those settings itself; what it shares with paploss's
# other RetinaNet config (the head, assigner, test settings, runtime) comes from the
# local base ./_base_/paploss_retinanet.py. Only the head changes from MMDetection's:
# PAPLossRetinaHead computes one loss, pap_loss over the whole batch (paploss
# SPEC §1), instead of Focal Loss + L1.
#
#     python tools/train.py configs/mmdet/paploss_retinanet_r50_fpn_1x_coco.py \
#         --cfg-options model.bbox_head.spec=runs/my-search/loss_spec.json
#
# The spec below is the loss the paper's authors searched on COCO for RetinaNet
# (their public release: five functions in the order H2, I2, I3, I1, H1, each 12
# numbers = 6 control points (x, y); gradient scale 4.1231). Replace it with your
# own search's result: a spec JSON path (local or s3://), an MLflow model URI
# ('models:/<name>@champion'), or inline points as here.
_base_ = ['./_base_/paploss_retinanet.py']

# The model: the base's RetinaNet with PAPLossRetinaHead, at R-50 FPN sizes.
model = dict(
    backbone=dict(
        depth=50,
        frozen_stages=1,
        norm_eval=True,
        # No download at run time (init_cfg=None, from the base). Where the
        # internet (or a local copy) is available, restore ImageNet weights with
        #   --cfg-options model.backbone.init_cfg.type=Pretrained \
        #                 model.backbone.init_cfg.checkpoint=torchvision://resnet50
    ),
    neck=dict(
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        start_level=1,
        add_extra_convs='on_input',
        num_outs=5),
    bbox_head=dict(
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        anchor_generator=dict(strides=[8, 16, 32, 64, 128]),
        spec=dict(
            points=[
                [0.0, 0.0, 0.4182, 0.0277, 0.4948, 0.2187, 0.6882, 0.2624, 0.802, 0.6688, 1.0, 1.0],  # H2
                [0.0, 0.0, 0.1279, 0.3696, 0.3056, 0.4708, 0.5198, 0.529, 0.6983, 0.6709, 1.0, 1.0],  # I2
                [0.0, 0.0, 0.0931, 0.0289, 0.3607, 0.5585, 0.4823, 0.7131, 0.6291, 0.8162, 1.0, 1.0],  # I3
                [0.0, 0.0, 0.4914, 0.1499, 0.5492, 0.1664, 0.6259, 0.3051, 0.7945, 0.6195, 1.0, 1.0],  # I1
                [0.0, 0.0, 0.413, 0.0798, 0.4356, 0.3571, 0.5361, 0.7063, 0.8097, 0.9083, 1.0, 1.0],  # H1
            ],
            grad_scale=4.1231)))

# COCO 2017 (MMDetection's coco_detection.py)
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val2017.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator

# 1x schedule (MMDetection's schedule_1x.py with retinanet's lr 0.01 for 16 images
# per batch); val_cfg and test_cfg come from the base
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001))
auto_scale_lr = dict(enable=False, base_batch_size=16)

# runtime (MMDetection's default_runtime.py; the hooks and settings both paploss
# configs use come from the base)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', interval=1),
    visualization=dict(type='DetVisualizationHook'))
env_cfg = dict(dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)
