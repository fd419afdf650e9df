/* Reset code for the emulated MPS2 board (qemu-system-arm): vector table, .data / .bss set-up,
 * FPU on, semihosting stdio, then main. Firmware for a real board uses its vendor's startup. */
#include <stdint.h>
#include <stdlib.h>

extern uint32_t __data_load, __data_start, __data_end, __bss_start, __bss_end, __stack_top;
extern int main(int argc, char **argv);
extern void initialise_monitor_handles(void);

void lrd_reset(void) {
  uint32_t *src = &__data_load, *dst = &__data_start;
  while (dst < &__data_end) *dst++ = *src++;
  for (dst = &__bss_start; dst < &__bss_end;) *dst++ = 0;
  *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20; /* CPACR: CP10, CP11 full access */
  __asm volatile("dsb\n\tisb");
  initialise_monitor_handles();
  static char *argv[] = {"lrd_qemu", 0};
  exit(main(1, argv));
}

static void lrd_fault(void) { exit(99); }

__attribute__((section(".vectors"), used)) static void (*const lrd_vectors[16])(void) = {
    (void (*)(void))&__stack_top, lrd_reset, lrd_fault, lrd_fault, lrd_fault, lrd_fault,
    lrd_fault};

/* Linked with -nostartfiles (no crti/crtn), but newlib's exit still calls these. */
void _init(void) {}
void _fini(void) {}
