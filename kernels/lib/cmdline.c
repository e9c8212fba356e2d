/*
 * The kernel command line: space-separated tokens, `key=value` ones looked up
 * by key (later occurrences override earlier ones, as on Linux), and the
 * `virtio_mmio.device=` tokens that name virtio-mmio transports.
 */
#include "lib.h"

/*
 * The value of the next `key=value` token from *pp on (it ends at a space or
 * NUL), or 0 if there is none; *pp moves past that token.
 */
static const char *next_value(const char **pp, const char *key)
{
    const char *p = *pp;
    const char *found = 0;

    while (*p && !found) {
        while (*p == ' ')
            p++;
        const char *k = key;
        while (*k && *p == *k)
            p++, k++;
        if (!*k && *p == '=')
            found = p + 1;
        while (*p && *p != ' ')
            p++;
    }
    *pp = p;
    return found;
}

bool param_u64(const char *cmdline, const char *key, u64 *val)
{
    const char *p = cmdline;
    const char *v;
    bool found = false;

    /* The last occurrence that is a number wins. */
    while ((v = next_value(&p, key))) {
        u64 n = 0;
        bool digits = false;
        for (; *v >= '0' && *v <= '9'; v++, digits = true)
            n = n * 10 + (u64)(*v - '0');
        if (digits && (*v == ' ' || *v == 0)) {
            *val = n;
            found = true;
        }
    }
    return found;
}

u64 param_or(const char *cmdline, const char *key, u64 dflt)
{
    u64 v;
    return param_u64(cmdline, key, &v) ? v : dflt;
}

const char *param_str(const char *cmdline, const char *key)
{
    const char *p = cmdline;
    const char *v, *found = 0;

    while ((v = next_value(&p, key)))
        found = v;
    return found;
}

bool value_is(const char *v, const char *s)
{
    while (*s && *v == *s)
        v++, s++;
    return !*s && (*v == ' ' || *v == 0);
}

void bad_parameter(const char *kernel, const char *key, const char *what, u8 status)
{
    put_str(kernel);
    put_str(": ");
    put_str(key);
    put_str(" must be ");
    put_line(what);
    debug_exit(status);
}

/* A number as Linux's %lli reads it here: 0x... hex or decimal. Returns the end, or 0. */
static const char *parse_num(const char *p, u64 *val)
{
    u64 v = 0;
    const char *start;

    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        for (p += 2, start = p;; p++) {
            char c = *p;
            if (c >= '0' && c <= '9')
                v = v << 4 | (u64)(c - '0');
            else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
                v = v << 4 | (u64)((c | 0x20) - 'a' + 10);
            else
                break;
        }
    } else {
        for (start = p; *p >= '0' && *p <= '9'; p++)
            v = v * 10 + (u64)(*p - '0');
    }
    if (p == start)
        return 0;
    *val = v;
    return p;
}

u32 cmdline_devices(const char *cmdline, u64 *addrs, u32 max)
{
    const char *p = cmdline;
    const char *v;
    u32 n = 0;

    while ((v = next_value(&p, "virtio_mmio.device"))) {
        while (*v && *v != ' ' && *v != '@')
            v++;
        u64 addr;
        const char *end = *v == '@' ? parse_num(v + 1, &addr) : 0;
        if (end && (*end == ':' || *end == ' ' || *end == 0) && n < max &&
            addr && addr < (4ul << 30) - PAGE_SIZE && !(addr & 3))
            addrs[n++] = addr;
    }
    return n;
}
