/*
 * Virtio over MMIO (virtio 1.x, register layout version 2) for the polled
 * drivers (blk, net): register offsets, split virtqueue layout, transport
 * discovery and the setup steps every device goes through. All at CPL3,
 * through the user-accessible identity map (guest physical = virtual).
 */
#ifndef KERNELS_VIRTIO_MMIO_H
#define KERNELS_VIRTIO_MMIO_H

#include "lib.h"

/* virtio-mmio registers (virtio 1.2, 4.2.2). */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MMIO_MAGIC               0x74726976 /* "virt" */

#define STATUS_ACKNOWLEDGE              1
#define STATUS_DRIVER                   2
#define STATUS_DRIVER_OK                4
#define STATUS_FEATURES_OK              8
#define STATUS_FAILED                   128

#define VIRTIO_F_VERSION_1              32

#define VIRTQ_DESC_F_NEXT               1
#define VIRTQ_DESC_F_WRITE              2
#define VIRTQ_AVAIL_F_NO_INTERRUPT      1

/* Largest queue the drivers use; a queue is min(QueueNumMax, this) rounded down to a power of two. */
#define VIRTQ_SIZE_MAX                  16

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[VIRTQ_SIZE_MAX];
    u16 used_event;
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[VIRTQ_SIZE_MAX];
    u16 avail_event;
};

/*
 * The first modern (Version 2) transport of device_id, or 0 if there is
 * none: each `virtio_mmio.device=` token in order, then understudy's 8 slots
 * at 0xd0000000 + i * 0x1000, then QEMU microvm's 24 at 0xfeb00000 + i *
 * 0x200 from the top. A device of that type with another Version is skipped
 * with "<kernel>: skipping virtio-mmio <kind> device version V at 0x...".
 */
u64 virtio_mmio_find(const char *cmdline, u32 device_id, const char *kernel, const char *kind);

/* Reset, ACKNOWLEDGE, DRIVER (virtio 1.2, 3.1.1); returns the features the device offers. */
u64 virtio_mmio_start(u64 base);

/* Writes the driver's features and sets FEATURES_OK; returns whether the device kept it. */
bool virtio_mmio_accept(u64 base, u64 features);

#define VIRTQ_ALREADY_READY             -1
#define VIRTQ_MISSING                   -2

/*
 * Sets up queue index (4.2.3.2): its size, the rings (avail flag
 * NO_INTERRUPT, both indices 0) and their addresses, QueueReady = 1.
 * Returns the size, or VIRTQ_ALREADY_READY or VIRTQ_MISSING (QueueNumMax 0)
 * with nothing written but QueueSel.
 */
int virtio_mmio_queue(u64 base, u16 index, struct virtq_desc *desc,
                      volatile struct virtq_avail *avail, volatile struct virtq_used *used);

/* Sets FAILED, prints "<kernel>: device setup failed: <why>" and ends the VM with debug_exit(status). */
__attribute__((noreturn)) void virtio_mmio_failed(u64 base, const char *kernel, const char *why,
                                                  u8 status);

#endif
