/** `nvmirror detach /dev/nbdN`: disconnect a device, whichever process attached it. */
import { Command } from 'commander';
import { AttachError, kernelDetach, parseNbdDevice, waitDetached } from '../attach/kernel';

/** How long to wait for the kernel to finish tearing the device down. */
const DETACH_WAIT_MS = 10_000;

export function registerDetach(program: Command): void {
  program
    .command('detach')
    .description('disconnect /dev/nbdN (attached by `nvmirror attach` or any nbd client)')
    .argument('<DEVICE>', 'the device, /dev/nbdN')
    .action(async (device: string) => {
      const index = parseNbdDevice(device);
      await kernelDetach(device);
      if (!(await waitDetached(index, DETACH_WAIT_MS))) {
        throw new AttachError('EIO', `${device} is still attached ${DETACH_WAIT_MS / 1000} s after the disconnect request`);
      }
      process.stdout.write(`nvmirror: ${device} detached\n`);
    });
}
