/* Virtio-mmio transport discovery and device setup shared by blk and net. */
#include "virtio_mmio.h"

/* Where to look when the command line names no transport. */
#define UNDERSTUDY_MMIO_BASE            0xd0000000ul
#define UNDERSTUDY_MMIO_STRIDE          0x1000
#define UNDERSTUDY_MMIO_SLOTS           8
#define MICROVM_MMIO_BASE               0xfeb00000ul
#define MICROVM_MMIO_STRIDE             0x200
#define MICROVM_MMIO_SLOTS              24
#define MAX_CMDLINE_DEVICES             8

/* A modern virtio transport of device_id at base? */
static bool probe(u64 base, u32 device_id, const char *kernel, const char *kind)
{
    if (mmio_read32(base + VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC &&
        mmio_read32(base + VIRTIO_MMIO_DEVICE_ID) == device_id) {
        u32 version = mmio_read32(base + VIRTIO_MMIO_VERSION);
        if (version == 2)
            return true;
        put_str(kernel);
        put_str(": skipping virtio-mmio ");
        put_str(kind);
        put_str(" device version ");
        put_u64(version);
        put_str(" at ");
        put_hex(base);
        put_str("\n");
    }
    return false;
}

u64 virtio_mmio_find(const char *cmdline, u32 device_id, const char *kernel, const char *kind)
{
    u64 addrs[MAX_CMDLINE_DEVICES];
    u32 n = cmdline_devices(cmdline, addrs, MAX_CMDLINE_DEVICES);

    for (u32 i = 0; i < n; i++)
        if (probe(addrs[i], device_id, kernel, kind))
            return addrs[i];
    for (u32 i = 0; i < UNDERSTUDY_MMIO_SLOTS; i++) {
        u64 base = UNDERSTUDY_MMIO_BASE + i * UNDERSTUDY_MMIO_STRIDE;
        if (probe(base, device_id, kernel, kind))
            return base;
    }
    /* From the top: QEMU plugs its first -device into the highest transport. */
    for (u32 i = MICROVM_MMIO_SLOTS; i-- > 0;) {
        u64 base = MICROVM_MMIO_BASE + i * MICROVM_MMIO_STRIDE;
        if (probe(base, device_id, kernel, kind))
            return base;
    }
    return 0;
}

u64 virtio_mmio_start(u64 base)
{
    mmio_write32(base + VIRTIO_MMIO_STATUS, 0);
    for (int i = 0; i < 1000 && mmio_read32(base + VIRTIO_MMIO_STATUS) != 0; i++)
        cpu_relax();
    mmio_write32(base + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    mmio_write32(base + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 offered = mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES);
    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    return offered;
}

bool virtio_mmio_accept(u64 base, u64 features)
{
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, (u32)features);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, (u32)(features >> 32));
    mmio_write32(base + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    return mmio_read32(base + VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK;
}

int virtio_mmio_queue(u64 base, u16 index, struct virtq_desc *desc,
                      volatile struct virtq_avail *avail, volatile struct virtq_used *used)
{
    mmio_write32(base + VIRTIO_MMIO_QUEUE_SEL, index);
    if (mmio_read32(base + VIRTIO_MMIO_QUEUE_READY))
        return VIRTQ_ALREADY_READY;
    u32 max = mmio_read32(base + VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (!max)
        return VIRTQ_MISSING;
    u16 size = VIRTQ_SIZE_MAX;
    while (size > max)
        size >>= 1;
    avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    avail->idx = 0;
    used->idx = 0;
    mmio_write32(base + VIRTIO_MMIO_QUEUE_NUM, size);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)pa(desc));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(pa(desc) >> 32));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)pa(avail));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)(pa(avail) >> 32));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)pa(used));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)(pa(used) >> 32));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_READY, 1);
    return size;
}

void virtio_mmio_failed(u64 base, const char *kernel, const char *why, u8 status)
{
    mmio_write32(base + VIRTIO_MMIO_STATUS, mmio_read32(base + VIRTIO_MMIO_STATUS) | STATUS_FAILED);
    put_str(kernel);
    put_str(": device setup failed: ");
    put_line(why);
    debug_exit(status);
}
