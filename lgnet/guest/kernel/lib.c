/*
 * lib.c - the few C library pieces a freestanding kernel needs.
 *
 * gcc may call memcpy/memset/memmove/memcmp on its own (structure copies),
 * so they must exist.  We link no libgcc, so 64-bit division is done by hand
 * (do_div, with the i386 "divl" instruction, as Linux's asm/div64.h did).
 * printk() understands %s %c %d %u %x and %p, with a width, '0' and '#'.
 */
#include "kernel.h"

/* "rep movsb" and "rep stosb" also keep gcc from turning our loops back
 * into calls to memcpy/memset. */
/* Each round of a rep string instruction is an instruction of its own under
 * Unicorn (and a counted one): so a word at a time, then the odd bytes. */
void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	size_t words = n / 4, bytes = n % 4;

	asm volatile("rep movsl" : "+D"(d), "+S"(src), "+c"(words) : : "memory");
	asm volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(bytes) : : "memory");
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;

	asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;

	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	for (; *a && *a == *b; a++, b++)
		;
	return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (u8)*a - (u8)*b;
		if (!*a)
			break;
	}
	return 0;
}

/* Decimal digits at *s; *s is left after them. */
u32 parse_uint(const char **s)
{
	u32 n = 0;

	while (**s >= '0' && **s <= '9')
		n = n * 10 + (u32)(*(*s)++ - '0');
	return n;
}

/*
 * *n /= base, returning the remainder.  "divl" divides edx:eax by a 32-bit
 * number but faults if the quotient does not fit 32 bits, so divide the high
 * word first: what is left of it (< base) makes the second quotient fit.
 */
u32 do_div(u64 *n, u32 base)
{
	u32 high = (u32)(*n >> 32), low = (u32)*n, q_high = 0, rem;

	if (high >= base) {
		q_high = high / base;
		high %= base;
	}
	asm("divl %2" : "=a"(low), "=d"(rem) : "rm"(base), "0"(low), "1"(high));
	*n = ((u64)q_high << 32) | low;
	return rem;
}

/* --- printf-lite ---------------------------------------------------------- */

struct out {
	char *buf;
	size_t size, len;
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void put_number(struct out *o, u32 n, unsigned int base, int negative,
		       unsigned int width, char pad, const char *prefix)
{
	char digits[12];
	unsigned int i = 0, len;

	do {
		digits[i++] = "0123456789abcdef"[n % base];
		n /= base;
	} while (n);
	len = i + negative + strlen(prefix);
	if (pad == ' ')
		for (; width > len; width--)
			put(o, ' ');
	if (negative)
		put(o, '-');
	while (*prefix)
		put(o, *prefix++);
	for (; width > len; width--)
		put(o, '0');
	while (i)
		put(o, digits[--i]);
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct out o = { buf, size, 0 };

	for (; *fmt; fmt++) {
		unsigned int width = 0;
		int alt = 0;
		char pad = ' ';

		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		fmt++;
		if (*fmt == '#') {
			alt = 1;
			fmt++;
		}
		if (*fmt == '0')
			pad = '0';
		width = parse_uint(&fmt);
		while (*fmt == 'l')
			fmt++;
		switch (*fmt) {
		case 'd': {
			int v = va_arg(ap, int);

			put_number(&o, v < 0 ? -(u32)v : (u32)v, 10, v < 0, width, pad, "");
			break;
		}
		case 'u':
			put_number(&o, va_arg(ap, u32), 10, 0, width, pad, "");
			break;
		case 'x':
			put_number(&o, va_arg(ap, u32), 16, 0, width, pad, alt ? "0x" : "");
			break;
		case 'p':
			put_number(&o, (u32)va_arg(ap, void *), 16, 0, width, pad, "0x");
			break;
		case 'c':
			put(&o, (char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			size_t n = strlen(s);

			for (; width > n; width--)
				put(&o, ' ');
			while (*s)
				put(&o, *s++);
			break;
		}
		case '%':
			put(&o, '%');
			break;
		default:	/* unknown: print it as it was */
			put(&o, '%');
			if (!*fmt) {
				fmt--;
				break;
			}
			put(&o, *fmt);
		}
	}
	if (size)
		buf[o.len < size ? o.len : size - 1] = '\0';
	return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

void printk(const char *fmt, ...)
{
	static char line[512];
	u32 flags = irq_save();		/* "line" is shared with interrupt handlers */
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	console_write(line, n < (int)sizeof(line) ? (unsigned int)n : sizeof(line) - 1);
	irq_restore(flags);
}

/* Nanoseconds as milliseconds with three decimals: "0.812". */
void print_ms(char *buf, size_t size, u64 ns)
{
	u64 us = ns;
	u32 frac;

	do_div(&us, 1000);
	frac = do_div(&us, 1000);
	snprintf(buf, size, "%u.%03u", (u32)us, frac);
}
