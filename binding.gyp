{
  "targets": [
    {
      "target_name": "nvmirror_native",
      "sources": [
        "native/addon.cc",
        "native/io.cc",
        "native/nvram.cc",
        "native/checksum.cc",
        "native/parity.cc",
        "native/nbd_attach.cc",
        "native/nbd_serve.cc",
        "native/delta.cc",
        "native/mirror_rx.cc",
        "native/priority.cc",
        "native/log_writer.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra"],
      "cflags": ["-O2"]
    }
  ]
}
