/* A test harness for the generated model: reads input.bin (raw float32, LRD_INPUT_COUNT values),
 * calls lrd_run once, writes output.bin (LRD_OUTPUT_COUNT values). The same file runs on the
 * host and on the emulated board, where stdio goes through semihosting to the host's files.
 * Not needed in firmware: link model.c + kernels.c (or liblrd_model.a) and call lrd_run. */
#include <stdio.h>

#include "model.h"

static float input[LRD_INPUT_COUNT];
static float output[LRD_OUTPUT_COUNT];

int main(int argc, char **argv) {
  const char *in_path = argc > 1 ? argv[1] : "input.bin";
  const char *out_path = argc > 2 ? argv[2] : "output.bin";
  FILE *in = fopen(in_path, "rb");
  if (!in || fread(input, sizeof(float), LRD_INPUT_COUNT, in) != LRD_INPUT_COUNT) {
    fprintf(stderr, "%s: cannot read %d float32 values\n", in_path, LRD_INPUT_COUNT);
    return 2;
  }
  fclose(in);
  int status = lrd_run(input, output);
  if (status != 0) {
    fprintf(stderr, "lrd_run failed at step %d\n", status);
    return 3;
  }
  FILE *out = fopen(out_path, "wb");
  if (!out || fwrite(output, sizeof(float), LRD_OUTPUT_COUNT, out) != LRD_OUTPUT_COUNT) {
    fprintf(stderr, "%s: cannot write the output\n", out_path);
    return 4;
  }
  fclose(out);
  printf("lrd_run: ok, %d outputs written to %s\n", LRD_OUTPUT_COUNT, out_path);
  return 0;
}
