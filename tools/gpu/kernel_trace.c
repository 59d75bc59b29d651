// A CUPTI injection library: every kernel, memset and memcpy a CUDA process runs, with its GPU
// start and end, and every driver API call with its host start and end (kind A, the calling
// thread in place of the stream), written as CSV lines `kind,start_ns,end_ns,stream,name` to
// $KLEIN_TRACE_OUT (one clock for both).
// The device machines have no Nsight Systems; this gives the timeline of a bench run, e.g. the
// gaps between a step's kernels (tools/gpu/trace_gaps.py reads it).
//
// Built by tools/gpu/build.sh (gcc against the CUPTI headers of the nvidia-cuda-cupti wheel);
// run as CUDA_INJECTION64_PATH=$PWD/libkernel_trace.so KLEIN_TRACE_OUT=trace.csv klein-bench ...
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

static FILE* out;

static void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = 16u << 20;
  *buffer = aligned_alloc(ACTIVITY_RECORD_ALIGNMENT, *size);
  *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t size,
                                      size_t valid) {
  (void)ctx;
  (void)stream;
  (void)size;
  CUpti_Activity* record = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      const CUpti_ActivityKernel10* k = (const CUpti_ActivityKernel10*)record;
      fprintf(out, "K,%llu,%llu,%u,%s\n", (unsigned long long)k->start,
              (unsigned long long)k->end, k->streamId, k->name);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const CUpti_ActivityMemset4* m = (const CUpti_ActivityMemset4*)record;
      fprintf(out, "S,%llu,%llu,%u,memset %llu bytes\n", (unsigned long long)m->start,
              (unsigned long long)m->end, m->streamId, (unsigned long long)m->bytes);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
      const CUpti_ActivityAPI* a = (const CUpti_ActivityAPI*)record;
      const char* name = "?";
      cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
      fprintf(out, "A,%llu,%llu,%u,%s\n", (unsigned long long)a->start, (unsigned long long)a->end,
              a->threadId, name);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const CUpti_ActivityMemcpy6* m = (const CUpti_ActivityMemcpy6*)record;
      fprintf(out, "C,%llu,%llu,%u,memcpy kind %u %llu bytes\n", (unsigned long long)m->start,
              (unsigned long long)m->end, m->streamId, (unsigned)m->copyKind,
              (unsigned long long)m->bytes);
    }
  }
  free(buffer);
}

static void flush_at_exit(void) {
  cuptiActivityFlushAll(1);
  fflush(out);
}

int InitializeInjection(void) {
  const char* path = getenv("KLEIN_TRACE_OUT");
  out = fopen(path != NULL ? path : "kernel_trace.csv", "w");
  if (out == NULL) return 0;
  cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  if (getenv("KLEIN_TRACE_API") != NULL) cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
  cuptiActivityFlushPeriod(200);
  atexit(flush_at_exit);
  return 1;
}
